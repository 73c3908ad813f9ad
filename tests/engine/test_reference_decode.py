"""The engine decodes as if each (layer, KV head) saw exactly the rows the policy keeps.

A reference with no SGLang in it: transformers runs the same tiny random Llama (4 query / 2 KV
heads, so a KV row serves a group of query heads), takes every layer's window scores from its own
prefill (:class:`bench.needle_layers.ScoreCapture`), lets the policy's ``select`` choose the rows,
and then, teacher-forced on the engine's reply, lets every generated token attend only to those
prompt rows (per KV head) and to the generated tokens before it. In float32 its greedy choice
at every step must be the engine's token, for uniform heads and for adaptive (ragged) heads.
"""

from __future__ import annotations

import pytest
import torch

from dkv_sglang.policy import PolicyConfig, select

from .conftest import SAMPLING, run_engine

pytestmark = pytest.mark.engine

BUDGET = 32


class KeptRowsAttention:
    """A transformers attention function: prompt queries attend causally to everything; a query
    at position >= ``prompt_len`` attends to the kept prompt rows of its KV head and to every
    generated position up to itself."""

    name = "dkv_kept_rows"

    def __init__(self, keep_mask: torch.Tensor):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        self.keep = keep_mask  # [L, H_kv, n]
        AttentionInterface.register(self.name, self)
        ALL_MASK_ATTENTION_FUNCTIONS.register(self.name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        hq, hkv, q_len, k_len = query.shape[1], key.shape[1], query.shape[2], key.shape[2]
        group, n = hq // hkv, self.keep.shape[-1]
        allowed = torch.ones(hq, q_len, k_len, dtype=torch.bool).tril()
        allowed[:, n:, :n] &= self.keep[module.layer_idx].repeat_interleave(group, dim=0)[:, None, :]
        logits = query @ key.repeat_interleave(group, dim=1).transpose(-1, -2) * scaling
        weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        return (weights @ value.repeat_interleave(group, dim=1)).transpose(1, 2), None


def greedy_choices(model, keep_mask: torch.Tensor, prompt: list[int], reply: list[int]) -> list[int]:
    """The greedy token at every step of ``reply``, teacher-forced, each generated token attending
    only to the prompt rows ``keep_mask`` [L, H_kv, n] keeps."""
    model.set_attn_implementation(KeptRowsAttention(keep_mask).name)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + reply[:-1]])).logits[0, len(prompt) - 1:]
    return logits.argmax(dim=-1).tolist()


def reference_selection(model, prompt: list[int], cfg: PolicyConfig):
    """What the policy keeps, chosen on the reference's own prefill scores."""
    from bench.needle_layers import ScoreCapture, layer_scores

    capture = ScoreCapture(cfg.window)
    model.set_attn_implementation(capture.name)
    return select(layer_scores(model, capture, prompt), len(prompt), cfg)


@pytest.fixture(scope="module")
def reference(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


@pytest.fixture(scope="module", params=[("snapkv", "uniform"), ("snapkv", "adaptive"), ("dynamickv", "adaptive")],
                ids=lambda p: "+".join(p))
def served(request, tiny_model, prompts):
    policy, heads = request.param
    run = run_engine(tiny_model, prompts, kv_policy=policy, kv_budget=BUDGET, kv_head_budgets=heads)
    return PolicyConfig(policy=policy, budget=BUDGET, head_budgets=heads), run


def test_every_decoded_token_is_the_references(served, reference, prompts):
    cfg, run = served
    kept = {r["prompt_tokens"]: r["kv_kept_per_head"] for r in run["stats"]["recent"]}
    unequal = False
    for prompt, reply in zip(prompts, run["alone"]):
        assert len(reply) == SAMPLING["max_new_tokens"] and len(prompt) > BUDGET
        sel = reference_selection(reference, prompt, cfg)
        assert kept[len(prompt)] == sel.kept_per_head, "the engine kept the rows the reference chose"
        assert greedy_choices(reference, sel.keep_mask(), prompt, reply) == reply
        unequal |= any(len(set(layer)) > 1 for layer in sel.kept_per_head)
    assert unequal == (cfg.head_budgets == "adaptive"), "adaptive heads, and only they, hold unequal rows"


def test_the_reference_sees_the_compression(served, reference, prompts):
    """Equality above means something: attending to every prompt row changes some reply."""
    _, run = served
    shape = (reference.config.num_hidden_layers, reference.config.num_key_value_heads)
    changed = sum(greedy_choices(reference, torch.ones(*shape, len(p), dtype=torch.bool), p, reply) != reply
                  for p, reply in zip(prompts, run["alone"]))
    assert changed > 0
