"""The baselines users compare DynamicKV with, over the same pool and flags (pure torch).

Every policy keeps, per request, ``budget`` rows per layer on average, window included:

- ``streamingllm``: the first 4 tokens (attention sinks) and the most recent ones;
- ``snapkv``: the same budget in every layer; per KV head the top prefix tokens by pooled
  window score, plus the window;
- ``pyramidkv``: SnapKV's selection under PyramidKV's linearly decreasing per-layer budgets.

SnapKV and PyramidKV take ``--kv-head-budgets adaptive`` as DynamicKV does (:mod:`.heads`);
StreamingLLM has no scores to share rows by and keeps the same rows in every head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import SINKS, PolicyConfig
from .dynamickv import Selection, fill_surplus, layer_kept, selection
from .reduce import LOCAL
from .heads import head_scale
from .scoring import pool_scores

PYRAMID_BETA = 20  # PyramidKV: the top layer keeps base / beta rows


def _top_prefix(layer_scores, counts: Sequence[int], n: int, cfg: PolicyConfig, reducer=LOCAL) -> Selection:
    layers = []
    for scores, k in zip(layer_scores, counts):
        pooled = pool_scores(scores.float().cpu(), cfg.kernel, cfg.pooling)
        ranked, order = pooled.sort(dim=-1, descending=True, stable=True)  # ties: earlier position first
        layers.append(layer_kept(ranked, order, head_scale(pooled, cfg.head_budgets), k, n, cfg, reducer))
    return selection(n, [k for k, _ in layers], torch.stack([c for _, c in layers]), reducer)


def select_streamingllm(layer_scores, prompt_len: int, cfg: PolicyConfig, reducer=LOCAL) -> Selection | None:
    n = prompt_len
    if n <= cfg.budget:
        return None
    sinks = min(SINKS, cfg.budget - 1)
    heads = layer_scores[0].shape[0]
    pos = torch.cat([torch.arange(sinks), torch.arange(n - (cfg.budget - sinks), n)])
    return selection(n, [pos.expand(heads, -1).clone() for _ in layer_scores], reducer=reducer)


def select_snapkv(layer_scores, prompt_len: int, cfg: PolicyConfig, reducer=LOCAL) -> Selection | None:
    if prompt_len <= cfg.budget:
        return None
    return _top_prefix(layer_scores, [cfg.base] * len(layer_scores), prompt_len, cfg, reducer)


def pyramid_budgets(num_layers: int, base: int, cap: int) -> list[int]:
    """PyramidKV's schedule: from 2*base - base/beta at layer 0 down to base/beta at the top,
    summing to base * num_layers; capped at ``cap`` with the surplus given to layers with room."""
    if num_layers == 1:
        return [min(base, cap)]
    lo = base / PYRAMID_BETA
    hi = 2 * base - lo
    step = (hi - lo) / (num_layers - 1)
    budgets = [int(hi - layer * step) for layer in range(num_layers)]
    budgets[0] += base * num_layers - sum(budgets)
    capped = [min(b, cap) for b in budgets]
    return fill_surplus(capped, budgets, cap, base * num_layers)


def select_pyramidkv(layer_scores, prompt_len: int, cfg: PolicyConfig, reducer=LOCAL) -> Selection | None:
    if prompt_len <= cfg.budget:
        return None
    counts = pyramid_budgets(len(layer_scores), cfg.base, prompt_len - cfg.window)
    return _top_prefix(layer_scores, counts, prompt_len, cfg, reducer)
