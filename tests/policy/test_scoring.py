import math

import torch

from dkv_sglang.policy import pool_scores, window_scores


def test_window_scores_by_hand():
    # One KV head, one query head, D=1, n=3 tokens, window w=2 (tokens 1 and 2).
    keys = torch.tensor([[[0.0], [1.0], [2.0]]])  # [1, 3, 1]
    q = torch.tensor([[[1.0]], [[1.0]]])  # [w=2, Hq=1, D=1]
    s = window_scores(q, keys, scaling=1.0)
    # query at pos 1 sees keys 0,1: softmax(0,1); query at pos 2 sees 0,1,2: softmax(0,1,2).
    # Prefix = token 0 only: score = e^0/(e^0+e^1) + e^0/(e^0+e^1+e^2).
    expected = 1 / (1 + math.e) + 1 / (1 + math.e + math.e**2)
    assert s.shape == (1, 1)
    assert abs(s.item() - expected) < 1e-6


def test_gqa_group_mean_and_head_layout():
    torch.manual_seed(0)
    keys = torch.randn(2, 10, 4)  # 2 KV heads
    q = torch.randn(3, 4, 4)  # w=3, 4 query heads: heads 0,1 -> KV 0; 2,3 -> KV 1
    s = window_scores(q, keys, scaling=0.5)
    per_q_head = [window_scores(q[:, h : h + 1], keys[h // 2 : h // 2 + 1], 0.5)[0] for h in range(4)]
    assert torch.allclose(s[0], (per_q_head[0] + per_q_head[1]) / 2, atol=1e-6)
    assert torch.allclose(s[1], (per_q_head[2] + per_q_head[3]) / 2, atol=1e-6)


def test_scores_are_fp32_even_for_bf16_inputs():
    keys = torch.randn(1, 6, 8, dtype=torch.bfloat16)
    q = torch.randn(2, 1, 8, dtype=torch.bfloat16)
    assert window_scores(q, keys, 1.0).dtype == torch.float32


def test_pooling_by_hand():
    x = torch.tensor([[0.0, 3.0, 0.0, 0.0, 6.0]])
    # kernel 3, padding 1: avg counts the zero padding.
    assert pool_scores(x, 3, "avg").tolist() == [[1.0, 1.0, 1.0, 2.0, 2.0]]
    assert pool_scores(x, 3, "max").tolist() == [[3.0, 3.0, 3.0, 6.0, 6.0]]
    # kernel 7, padding 3, length kept
    y = pool_scores(torch.arange(10.0)[None], 7, "avg")
    assert y.shape == (1, 10) and abs(y[0, 0].item() - (0 + 1 + 2 + 3) / 7) < 1e-6
