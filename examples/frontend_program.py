"""An SGLang frontend program (``sgl.function``: gen, fork, select) run unchanged against a
dkv-sglang server: the long document is compressed per request, the program does not notice.

    python -m dkv_sglang.launch_server --model-path models/smollm2 --kv-policy dynamickv --kv-budget 128 --port 30000
    python examples/frontend_program.py --url http://127.0.0.1:30000
"""

from __future__ import annotations

import argparse

import sglang as sgl


@sgl.function
def review(s, document: str, question: str):
    s += sgl.system("You read documents carefully and answer briefly.")
    s += sgl.user(document + "\n\n" + question)
    s += sgl.assistant(sgl.gen("answer", max_tokens=32, temperature=0))
    # two follow-ups explored in parallel from the same state
    forks = s.fork(2)
    for f, ask in zip(forks, ("Give one keyword.", "Give one number.")):
        f += sgl.user(ask)
        f += sgl.assistant(sgl.gen("followup", max_tokens=8, temperature=0))
    s["followups"] = [f["followup"] for f in forks]
    s += sgl.user("Is the answer above certain?")
    s += sgl.assistant(sgl.select("certain", choices=["yes", "no"]))


def run(url: str, document: str, question: str) -> dict:
    sgl.set_default_backend(sgl.RuntimeEndpoint(url))
    state = review.run(document=document, question=question)
    return {"answer": state["answer"], "followups": state["followups"], "certain": state["certain"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    a = ap.parse_args()
    doc = " ".join(f"Fact {i}: the lighthouse keeper counted {i * 7} ships." for i in range(120))
    print(run(a.url, doc, "How many ships did the keeper count in fact 40?"))


if __name__ == "__main__":
    main()
