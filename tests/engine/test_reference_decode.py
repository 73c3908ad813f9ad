"""The engine decodes as if each (layer, KV head) saw exactly the rows the policy keeps.

A reference with no SGLang in it: transformers runs the same tiny random Llama (4 query / 2 KV
heads, so a KV row serves a group of query heads), takes every layer's window scores from its own
prefill (:class:`bench.needle_layers.ScoreCapture`), lets the policy's ``select`` choose the rows,
and then decodes greedily from its own KV cache, every generated token attending only to those
prompt rows (per KV head) and to the generated tokens before it: ``bench.screen``'s decode, batched
with a full-KV row beside it. In float32 every token must be the engine's, for uniform heads and
for ragged heads (adaptive, max).
"""

from __future__ import annotations

import pytest
import torch

from dkv_sglang.policy import PolicyConfig, select

from .conftest import SAMPLING, run_engine

pytestmark = pytest.mark.engine

BUDGET = 32


def reference_replies(model, prompt: list[int], cfg: PolicyConfig, steps: int):
    """The reference's own prefill, what the policy keeps on its scores, and the greedy replies of
    that keep mask and of full KV, decoded side by side in one batch (:func:`bench.screen.decode`)."""
    from bench.needle_layers import ScoreCapture
    from bench.screen import decode, prefill

    scores, cache, first = prefill(model, ScoreCapture(cfg.window), prompt)
    sel = select(scores, len(prompt), cfg)
    keep = torch.stack([sel.keep_mask(), torch.ones_like(sel.keep_mask())])
    return sel, decode(model, cache, first, keep, steps)


@pytest.fixture(scope="module")
def reference(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module", ids=lambda p: "+".join(p),
                params=[("snapkv", "uniform"), ("snapkv", "adaptive"), ("dynamickv", "adaptive"), ("dynamickv", "max")])
def served(request, tiny_model, prompts):
    policy, heads = request.param
    run = run_engine(tiny_model, prompts, kv_policy=policy, kv_budget=BUDGET, kv_head_budgets=heads)
    return PolicyConfig(policy=policy, budget=BUDGET, head_budgets=heads), run


@pytest.fixture(scope="module")
def compared(served, reference, prompts):
    cfg, run = served
    return cfg, run, [reference_replies(reference, p, cfg, SAMPLING["max_new_tokens"]) for p in prompts]


def test_every_decoded_token_is_the_references(compared, prompts):
    cfg, run, refs = compared
    kept = {r["prompt_tokens"]: r["kv_kept_per_head"] for r in run["stats"]["recent"]}
    unequal = False
    for prompt, reply, (sel, (mine, _)) in zip(prompts, run["alone"], refs):
        assert len(reply) == SAMPLING["max_new_tokens"] and len(prompt) > BUDGET
        assert kept[len(prompt)] == sel.kept_per_head, "the engine kept the rows the reference chose"
        assert mine == reply
        unequal |= any(len(set(layer)) > 1 for layer in sel.kept_per_head)
    assert unequal == (cfg.head_budgets != "uniform"), "non-uniform heads, and only they, hold unequal rows"


def test_the_reference_sees_the_compression(compared):
    """Equality above means something: the same batch's full-KV row changes some reply."""
    _, run, refs = compared
    assert sum(full != reply for reply, (_, (_, full)) in zip(run["alone"], refs)) > 0
