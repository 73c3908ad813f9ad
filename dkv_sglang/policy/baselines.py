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

import torch

from .config import SINKS, PolicyConfig
from .dynamickv import fill_surplus
from .heads import head_rows, head_scale, kept_positions, safeguard
from .ranking import top_rows
from .reduce import LOCAL
from .scoring import pool_scores

PYRAMID_BETA = 20  # PyramidKV: the top layer keeps base / beta rows


def _top_prefix(scores: torch.Tensor, per_layer: list[int], n: int, cfg: PolicyConfig,
                reducer=LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
    """Each (request, layer) keeps ``per_layer[l]`` top prefix rows per head by pooled score
    (or, with adaptive head budgets, its heads share ``H x per_layer[l]``), plus the window."""
    requests, _, heads, prefix = scores.shape
    pooled = pool_scores(scores.float(), cfg.kernel, cfg.pooling)
    most = max(per_layer)
    # a head keeps at most its floor and all of the layer's top-k: only those rows are ranked
    every = heads * reducer.world
    rows = most if cfg.head_budgets == "uniform" else max(safeguard(k) + (k - safeguard(k)) * every for k in per_layer)
    ranked, order = top_rows(pooled, min(rows, prefix))  # ties: earlier position first
    per_head = torch.tensor(per_layer, dtype=torch.int64, device=scores.device).expand(requests, -1)
    counts = head_rows(ranked, head_scale(pooled, cfg.head_budgets), per_head, most, cfg.head_budgets, reducer)
    return kept_positions(order, counts, n, cfg.window), counts + cfg.window


def choose_streamingllm(scores: torch.Tensor, prompt_len: int, cfg: PolicyConfig,
                        reducer=LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
    """Every head of every layer keeps the first SINKS tokens and the most recent ones."""
    n = prompt_len
    sinks = min(SINKS, cfg.budget - 1)
    device = scores.device
    pos = torch.cat([torch.arange(sinks, device=device), torch.arange(n - (cfg.budget - sinks), n, device=device)])
    shape = scores.shape[:-1]
    return pos.expand(*shape, -1).clone(), torch.full(shape, cfg.budget, dtype=torch.int64, device=device)


def choose_snapkv(scores: torch.Tensor, prompt_len: int, cfg: PolicyConfig,
                  reducer=LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
    """SnapKV: ``base`` top prefix rows per head in every layer, plus the window."""
    return _top_prefix(scores, [cfg.base] * scores.shape[1], prompt_len, cfg, reducer)


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


def choose_pyramidkv(scores: torch.Tensor, prompt_len: int, cfg: PolicyConfig,
                     reducer=LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
    """PyramidKV: SnapKV's selection under :func:`pyramid_budgets`."""
    per_layer = pyramid_budgets(scores.shape[1], cfg.base, prompt_len - cfg.window)
    return _top_prefix(scores, per_layer, prompt_len, cfg, reducer)
