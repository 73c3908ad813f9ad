"""bench.needle_layers: the needle's tokens, the captured window scores, the per-layer facts."""

import torch
from transformers import AutoModelForCausalLM

from bench.needle_layers import ScoreCapture, analyse, layer_scores, needle_tokens, summarise
from runtime.tiny_model import build


def test_needle_tokens_are_those_overlapping_an_answer():
    text = "the key is 123 45 and 123"
    offsets = [(0, 3), (4, 7), (8, 10), (11, 13), (13, 14), (15, 17), (18, 21), (22, 25)]
    # "123" at 11-14 (tokens 3, 4) and 22-25 (token 7); "45" at 15-17 (token 5)
    assert needle_tokens(text, ["123", "45"], offsets) == [3, 4, 5, 7]
    assert needle_tokens(text, ["999"], offsets) == []


def test_captured_scores_match_the_models_own_attention(tmp_path):
    # The capture sees the queries and keys after RoPE: its window scores must equal what the
    # model's eager attention weights give (last w query rows, summed, averaged over a KV group).
    folder = build(tmp_path / "tiny", layers=2)
    ids = torch.randint(0, 1000, (40,)).tolist()
    eager = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        attn = eager(torch.tensor([ids]), output_attentions=True).attentions
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    scores, _ = layer_scores(model, ScoreCapture(window=8), ids)
    assert len(scores) == len(attn) == 2
    for got, a in zip(scores, attn):
        hq, kv = a.shape[1], got.shape[0]
        want = a[0, :, -8:, :32].sum(dim=1).reshape(kv, hq // kv, 32).mean(dim=1)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_analyse_ranks_the_needle_and_counts_what_each_policy_keeps():
    # 2 layers, 1 KV head, 40 tokens (32 prefix + window 8): layer 0 puts the needle (positions
    # 20-21) on top, layer 1 ranks it last (0.0) behind 30 rows of 1.0.
    n, needle = 40, [20, 21]
    l0 = torch.full((1, 32), 0.01)
    l0[0, 20:22] = 1.0
    l1 = torch.ones(1, 32)
    l1[0, 20:22] = 0.0
    out = analyse([l0, l1], n, needle, ["snapkv", "streamingllm"], [16], window=8)
    # pooling (avg, kernel 7) spreads the needle over positions 18-23 equally; ties rank the
    # earlier position first, so position 20 is third
    assert out["rank"][0] == 2 and out["rank"][1] >= 20
    assert out["needle_kept"]["snapkv@16"] == [1.0, 0.0]  # 8 rows: the needle in layer 0 only
    assert out["needle_kept"]["streamingllm@16"] == [0.0, 0.0]  # sinks and the recent tokens
    assert out["kept"]["snapkv@16"] == [16, 16]
    s = summarise([out, out])
    assert s["prompts"] == 2 and s["needle_kept"]["snapkv@16"] == [1.0, 0.0]
