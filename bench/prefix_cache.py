"""What SGLang's prefix cache saves a compressing server: documents asked several questions.

Each document (random token ids, ``--doc-tokens`` long) is asked ``--turns`` questions, one
request at a time: prompt = document + question. The same requests go to two DynamicKV servers
(``--kv-budget``), one with the radix cache (the default) and one with ``--disable-radix-cache``.
For every request it records time to first token, ``meta_info.cached_tokens``, the tokens and the
rows kept; it reports the TTFT of the questions after the first (cache hits on the document) on
both servers and their ratio, and checks that both servers gave the same tokens and kept rows.

    python -m bench.prefix_cache            # about 5 minutes on 2 cores
Results: ``bench/results/prefix-cache.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import requests
from tqdm import tqdm

from .server import Server
from .throughput import RESULTS, bench_model

COMMON = ["--disable-overlap-schedule", "--log-level", "warning", "--dtype", "float32"]


def workload(docs: int, doc_tokens: int, turns: int, question_tokens: int, seed: int = 0) -> list[list[int]]:
    """Prompts in sending order: document 0's questions, then document 1's, ..."""
    rng = random.Random(seed)
    out = []
    for _ in range(docs):
        doc = [rng.randrange(100, 40000) for _ in range(doc_tokens)]
        out += [doc + [rng.randrange(100, 40000) for _ in range(question_tokens)] for _ in range(turns)]
    return out


def ask(url: str, ids: list[int], max_new_tokens: int) -> dict:
    """One streamed greedy request: TTFT, cached tokens, output ids, kept rows."""
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
    start = time.perf_counter()
    ttft, last = None, None
    with requests.post(url + "/generate", json=body, stream=True, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith(b"data:") or line == b"data: [DONE]":
                continue
            ttft = ttft if ttft is not None else time.perf_counter() - start
            last = json.loads(line[5:])
    meta = last["meta_info"]
    return {"ttft": ttft, "cached_tokens": meta.get("cached_tokens", 0), "output_ids": last["output_ids"],
            "kept_per_layer": meta.get("kv_kept_per_layer")}


def summarize(on: list[dict], off: list[dict], turns: int) -> dict:
    """Follow-up questions (not the first per document) on both servers, and agreement."""
    follow = [i for i in range(len(on)) if i % turns != 0]
    first = [i for i in range(len(on)) if i % turns == 0]
    mean = lambda runs, idx: statistics.mean(runs[i]["ttft"] for i in idx)  # noqa: E731
    return {
        "followup_ttft_cache_s": mean(on, follow),
        "followup_ttft_no_cache_s": mean(off, follow),
        "followup_speedup": mean(off, follow) / mean(on, follow),
        "first_ttft_cache_s": mean(on, first),
        "first_ttft_no_cache_s": mean(off, first),
        "followup_cached_tokens": statistics.mean(on[i]["cached_tokens"] for i in follow),
        "no_cache_cached_tokens": max(r["cached_tokens"] for r in off),
        "same_tokens": all(a["output_ids"] == b["output_ids"] for a, b in zip(on, off)),
        "same_kept_rows": all(a["kept_per_layer"] == b["kept_per_layer"] for a, b in zip(on, off)),
        "compressed": all(r["kept_per_layer"] is not None for r in on),
    }


def markdown(res: dict) -> str:
    s, a = res["summary"], res["args"]
    lines = [
        f"# Prefix cache with DynamicKV (budget {a['kv_budget']})",
        "",
        f"{a['docs']} documents of {a['doc_tokens']} tokens, {a['turns']} questions of {a['question_tokens']} "
        f"tokens each, one request at a time, {a['max_new_tokens']} output tokens. Model: {res['model']}.",
        "",
        "| | radix cache | --disable-radix-cache |",
        "|---|---|---|",
        f"| first question per document: TTFT (s) | {s['first_ttft_cache_s']:.2f} | {s['first_ttft_no_cache_s']:.2f} |",
        f"| follow-up questions: TTFT (s) | {s['followup_ttft_cache_s']:.2f} | {s['followup_ttft_no_cache_s']:.2f} |",
        f"| follow-up questions: cached tokens (mean) | {s['followup_cached_tokens']:.0f} | {s['no_cache_cached_tokens']} |",
        "",
        f"Follow-up TTFT: {s['followup_speedup']:.1f}x faster with the cache. "
        f"Same tokens on both servers: {'yes' if s['same_tokens'] else 'NO'}; "
        f"same kept rows: {'yes' if s['same_kept_rows'] else 'NO'}; "
        f"every request compressed: {'yes' if s['compressed'] else 'NO'}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-path", help="model to serve (default: the random 8-layer benchmark Llama)")
    ap.add_argument("--docs", type=int, default=3, help="documents (default 3)")
    ap.add_argument("--doc-tokens", type=int, default=3000, help="tokens per document (default 3000)")
    ap.add_argument("--turns", type=int, default=4, help="questions per document (default 4)")
    ap.add_argument("--question-tokens", type=int, default=40, help="tokens per question (default 40)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="output tokens per request (default 16)")
    ap.add_argument("--kv-budget", type=int, default=128, help="DynamicKV budget (default 128)")
    ap.add_argument("--name", default="prefix-cache", help="results file name under bench/results/")
    args = ap.parse_args(argv)
    model = args.model_path or bench_model(layers=8, hidden=256)  # the README's prefix-cache figures
    prompts = workload(args.docs, args.doc_tokens, args.turns, args.question_tokens)
    base = ["--model-path", model, "--kv-policy", "dynamickv", "--kv-budget", str(args.kv_budget), *COMMON]
    runs = {}
    for name, extra in (("cache", []), ("no_cache", ["--disable-radix-cache"])):
        with Server(base + extra, RESULTS / f"{args.name}-{name}.log") as url:
            ask(url, [7] * 32, 2)  # warm-up, shares no prefix with the workload
            runs[name] = [ask(url, p, args.max_new_tokens) for p in tqdm(prompts, desc=name)]
    res = {"args": vars(args), "model": args.model_path or "random 8-layer benchmark Llama",
           "summary": summarize(runs["cache"], runs["no_cache"], args.turns),
           "requests": {k: [{kk: vv for kk, vv in r.items() if kk != "output_ids"} for r in v] for k, v in runs.items()}}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(res, indent=1))
    text = markdown(res)
    (RESULTS / f"{args.name}.md").write_text(text)
    print(text)
    s = res["summary"]
    return 0 if s["same_tokens"] and s["same_kept_rows"] and s["compressed"] else 1


if __name__ == "__main__":
    sys.exit(main())
