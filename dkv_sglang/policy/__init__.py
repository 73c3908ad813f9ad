"""KV policies: pure torch, no SGLang import (tests prove it), usable on their own."""

from __future__ import annotations

import torch

from .config import POLICIES, PolicyConfig, PolicyConfigError
from .reduce import LOCAL
from .scoring import pool_scores, window_scores
from .selection import Selection, keep_masks, selections


def choose(
    scores: torch.Tensor, prompt_len: int, config: PolicyConfig, reducer=LOCAL
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows ``config.policy`` keeps for R requests of the same prompt length, on the scores'
    device, without a host sync.

    Args:
        scores:     [R, L, H, n - window] window scores of the prefix tokens (unpooled, any
                    float dtype, any device).
        prompt_len: n, more than ``config.budget``.
        reducer:    the tensor-parallel group when ``H`` is one rank's share of the heads:
                    every rank must call this for the same requests in the same order
                    (DynamicKV's layer budgets and adaptive head budgets span all ranks' heads).

    Returns:
        positions [R, L, H, W] int64: each head's kept prompt positions ascending, window
        included; a head keeping fewer than W repeats ``n - 1`` at the end, so scattering them
        into a mask is exact (:func:`keep_masks`). counts [R, L, H] int64: rows each head keeps,
        window included. W depends only on n, L, H and the config.
    """
    from . import baselines, dynamickv

    if prompt_len <= config.budget:
        raise ValueError(f"a prompt of {prompt_len} tokens fits the budget of {config.budget}: nothing to choose")
    chooser = {
        "dynamickv": dynamickv.choose,
        "snapkv": baselines.choose_snapkv,
        "pyramidkv": baselines.choose_pyramidkv,
        "streamingllm": baselines.choose_streamingllm,
    }[config.policy]
    return chooser(scores, prompt_len, config, reducer)


def select_batch(scores: torch.Tensor, prompt_len: int, config: PolicyConfig, reducer=LOCAL) -> list[Selection | None]:
    """:func:`choose`, then one host read of the counts: one :class:`Selection` per request
    (each None when ``prompt_len`` fits the budget: keep everything)."""
    if prompt_len <= config.budget:
        return [None] * scores.shape[0]
    positions, counts = choose(scores, prompt_len, config, reducer)
    return selections(positions, counts, prompt_len, reducer)


def select(layer_scores, prompt_len: int, config: PolicyConfig, reducer=LOCAL) -> Selection | None:
    """The rows ``config.policy`` keeps for one request (None: keep everything), from its
    per-layer scores ([H, n - window] each): :func:`select_batch` of one request."""
    return select_batch(torch.stack(list(layer_scores))[None], prompt_len, config, reducer)[0]


__all__ = [
    "POLICIES",
    "PolicyConfig",
    "PolicyConfigError",
    "Selection",
    "choose",
    "keep_masks",
    "pool_scores",
    "select",
    "select_batch",
    "window_scores",
]
