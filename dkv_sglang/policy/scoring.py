"""How much the observation window attends to each prefix token (pure torch, no SGLang).

DynamicKV (like SnapKV) scores prefix token j of a prompt of n tokens by the attention the
last ``w`` prompt queries pay to it: softmax in fp32, causal inside the window, summed over
the window queries, then smoothed by 1-D pooling.

GQA: one KV row serves a group of G query heads, so the G query heads' scores of a group are
combined by their mean (a uniform rescaling of the sum: it ranks tokens the same way).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def window_scores(q_window: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Window attention mass per KV head and prefix token.

    Args:
        q_window: [w, Hq, D], the queries of the last ``w`` prompt tokens (after RoPE).
        keys:     [Hkv, n, D], the keys of all ``n`` prompt tokens, in position order.
        scaling:  the softmax scale (1/sqrt(D) for standard attention).

    Returns:
        [Hkv, n - w] float32: for each KV head, the summed attention of the window queries
        to each prefix token, averaged over the head's query group.
    """
    w, hq, d = q_window.shape
    hkv, n, _ = keys.shape
    if hq % hkv:
        raise ValueError(f"{hq} query heads do not split into {hkv} KV groups")
    g = hq // hkv
    # Query head h belongs to KV head h // g (the GQA layout of HF and SGLang).
    q = q_window.float().permute(1, 0, 2).reshape(hkv, g * w, d)
    logits = torch.bmm(q, keys.float().transpose(1, 2)) * scaling  # [Hkv, g*w, n]
    logits = logits.view(hkv, g, w, n)
    qpos = torch.arange(n - w, n, device=keys.device)
    future = torch.arange(n, device=keys.device)[None, :] > qpos[:, None]  # [w, n]
    logits.masked_fill_(future, float("-inf"))
    attn = torch.softmax(logits, dim=-1)
    return attn[..., : n - w].sum(dim=2).mean(dim=1)


def pool_scores(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """1-D pooling along the last axis, stride 1, padding kernel//2 (the length is kept).

    ``avg`` counts the zero padding in the mean, as ``F.avg_pool1d``'s default does, and adds
    each window left to right before dividing, as its CPU kernel does (the same bits, several
    times faster on a CPU than ``avg_pool1d``'s 2-D path).
    """
    if pooling == "avg":
        length, pad = scores.shape[-1], kernel // 2
        padded = F.pad(scores.to(torch.promote_types(scores.dtype, torch.float32)), (pad, pad))  # acc as avg_pool1d
        total = padded[..., :length] + 0.0  # a fresh tensor, 0.0 + the first term as the kernel starts
        for shift in range(1, kernel):
            total += padded[..., shift : shift + length]
        # a tensor divisor: CUDA divides by a Python scalar as a multiply by its reciprocal
        return total.div_(torch.full_like(total[..., :1], kernel)).to(scores.dtype)
    if pooling == "max":
        shape = scores.shape
        return F.max_pool1d(scores.reshape(-1, 1, shape[-1]), kernel, stride=1, padding=kernel // 2).reshape(shape)
    raise ValueError(f"unknown pooling {pooling!r}")


def typical_row(pooled: torch.Tensor, median: torch.Tensor | None = None) -> torch.Tensor:
    """[..., 1] each head's typical (median) score over the last axis, floored at 1e-6 of its
    mean (and above 0), so a head whose median row is 0 still divides by something. ``median``
    ([..., 1]) saves finding it again when the caller knows it.

    Raw window mass is not comparable across heads: a head that pours its attention into a few
    tokens (a sink) leaves its other rows tiny, however far they stand above the rest of that
    head. Divided by it, a row scores how far it stands above its own head's background (the
    ``contrast`` allocation, and how heads compete under adaptive head budgets).
    """
    typical = pooled.median(dim=-1, keepdim=True).values if median is None else median
    return torch.maximum(typical, 1e-6 * pooled.mean(dim=-1, keepdim=True)).clamp_min(1e-30)
