"""The policy code as it was before selection was batched (issue 37), kept verbatim as the oracle
that tests/policy/test_batched.py compares the batched selection with, row for row.

Copied from dkv_sglang/policy/scoring.py (pooling, typical row), heads.py, dynamickv.py and
baselines.py at b49bec7; only imports changed. Test-only: nothing in dkv_sglang imports it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dkv_sglang.policy.config import HEAD_RULES, SINKS, PolicyConfig
from dkv_sglang.policy.reduce import LOCAL


def pool_scores(scores: torch.Tensor, kernel: int, pooling: str) -> torch.Tensor:
    """1-D pooling along the last axis, stride 1, padding kernel//2 (the length is kept).

    ``avg`` counts the zero padding in the mean, as ``F.avg_pool1d``'s default does.
    """
    shape = scores.shape
    x = scores.reshape(-1, 1, shape[-1])
    if pooling == "avg":
        y = F.avg_pool1d(x, kernel, stride=1, padding=kernel // 2)
    elif pooling == "max":
        y = F.max_pool1d(x, kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    return y.reshape(shape)


def typical_row(pooled: torch.Tensor) -> torch.Tensor:
    """[..., 1] each head's typical (median) score over the last axis, floored at 1e-6 of its
    mean (and above 0), so a head whose median row is 0 still divides by something.

    Raw window mass is not comparable across heads: a head that pours its attention into a few
    tokens (a sink) leaves its other rows tiny, however far they stand above the rest of that
    head. Divided by it, a row scores how far it stands above its own head's background (the
    ``contrast`` allocation, and how heads compete under adaptive head budgets).
    """
    typical = pooled.median(dim=-1, keepdim=True).values
    return torch.maximum(typical, 1e-6 * pooled.mean(dim=-1, keepdim=True)).clamp_min(1e-30)


ALPHA = 0.2  # Ada-KV's default safeguard share


def head_scale(pooled: torch.Tensor, mode: str) -> torch.Tensor:
    """[..., H, R] what each head's pooled prefix scores ([..., H, m]) are divided by before its
    heads compete, one column per rule the mode counts with (``HEAD_RULES``): the median row
    (``adaptive``), the mass past the first SINKS rows (``shares``), or both (``max``); one
    column of 1 for ``uniform``, where heads do not compete."""
    columns = [RULE_SCALES[rule](pooled) for rule in HEAD_RULES[mode]]
    return torch.cat(columns, dim=-1) if columns else torch.ones_like(pooled[..., :1])


def mass_past_sinks(pooled: torch.Tensor) -> torch.Tensor:
    """[..., 1] each head's pooled mass outside the first SINKS rows (``shares``' scale)."""
    rest = pooled[..., SINKS:] if pooled.shape[-1] > SINKS else pooled
    return rest.sum(dim=-1, keepdim=True).clamp_min(1e-30)


RULE_SCALES = {"adaptive": typical_row, "shares": mass_past_sinks}  # a rule's name -> what its heads' scores are over


def head_counts(ranked: torch.Tensor, scale: torch.Tensor, per_head: int, reducer=LOCAL) -> torch.Tensor:
    """[H] rows each head of one layer keeps: one :func:`adaptive_counts` per column of ``scale``
    ([H, R], :func:`head_scale`), the heads' scores divided by it; with two columns, each head
    the larger of its two counts (:func:`larger_counts`)."""
    counts = [adaptive_counts(ranked / scale[:, r : r + 1], per_head, reducer) for r in range(scale.shape[1])]
    return counts[0] if len(counts) == 1 else larger_counts(counts, per_head, reducer)


def larger_counts(counts: list[torch.Tensor], per_head: int, reducer=LOCAL) -> torch.Tensor:
    """[H] each head's larger count of ``counts`` (each [H], summing over all ranks' heads to
    ``per_head x`` all heads), scaled down to that same total: every head keeps the floor
    ``floor(ALPHA*per_head)``, and the rest go in proportion to each head's larger count above
    the floor, in integers (largest remainder, ties to the earlier head in rank order), so every
    rank computes the same counts. No head gets more than its larger count."""
    heads = counts[0].shape[0]
    larger = reducer.gather(torch.stack(counts).amax(dim=0))  # every rank's heads, rank by rank
    floor = int(ALPHA * per_head)
    above = larger - floor
    rest, total = (per_head - floor) * larger.shape[0], int(above.sum())
    if total == 0:
        share = torch.zeros_like(above)
    else:
        share, remainder = (above * rest) // total, (above * rest) % total
        left = rest - int(share.sum())  # fewer than the heads: one more row each for the largest remainders
        order = sorted(range(len(above)), key=lambda h: (-int(remainder[h]), h))
        share[order[:left]] += 1
    mine = share[reducer.rank * heads : (reducer.rank + 1) * heads]
    return floor + mine


def adaptive_counts(ranked: torch.Tensor, per_head: int, reducer=LOCAL) -> torch.Tensor:
    """Rows each head of one layer keeps when its heads share ``H x per_head``.

    Args:
        ranked:   [H, m] each head's candidate scores relative to its typical row, sorted
                  descending (m >= per_head).
        per_head: the uniform count.
        reducer:  the tensor-parallel group: ``H`` is this rank's share of the heads, and the
                  top-k runs over all ranks' heads.

    Returns:
        [H] int64 counts, each in [floor(ALPHA*per_head), m], summing over all ranks' heads to
        ``per_head x`` all heads. Rows tying the k-th score go to earlier heads (rank order).
    """
    heads, m = ranked.shape
    if per_head > m:
        raise ValueError(f"{per_head} rows per head asked of {m} candidates")
    floor = int(ALPHA * per_head)
    rest = ranked[:, floor:]
    k = (per_head - floor) * heads * reducer.world
    counts = torch.full((heads,), floor, dtype=torch.int64)
    if k == 0:
        return counts
    best = reducer.gather(rest.reshape(-1).topk(min(k, rest.numel())).values)
    kth = best.topk(k).values[-1]
    above = (rest > kth).sum(dim=1)
    ties = (rest == kth).sum(dim=1)
    left = k - int(reducer.sum(above.sum().reshape(1)))
    all_ties = reducer.gather(ties)  # every head's ties, rank by rank
    before = torch.cumsum(all_ties, 0) - all_ties
    take = (left - before).clamp(min=0).minimum(all_ties)
    mine = take[reducer.rank * heads : (reducer.rank + 1) * heads]
    return counts + above + mine


def ragged_kept(order: torch.Tensor, counts: torch.Tensor, n: int, window: int) -> torch.Tensor:
    """[H, w] what one layer keeps when head h keeps the first ``counts[h]`` prefix positions of
    ``order[h]``, plus the window; ascending, and a head keeping fewer rows than the widest
    repeats ``n - 1`` (its last window position) at the end, so scattering the positions into a
    mask gives exactly each head's rows."""
    heads = order.shape[0]
    width = int(counts.max()) if heads else 0
    pos = order[:, :width].clone()
    pos[torch.arange(width)[None, :] >= counts[:, None]] = n - 1
    win = torch.arange(n - window, n).expand(heads, window)
    return torch.cat([pos, win], dim=1).sort(dim=1).values


@dataclass(frozen=True)
class Selection:
    """The rows one request keeps, in this process's KV heads.

    ``kept[l]`` is [H, w_l], ascending prompt positions; ``counts[l, h]`` is how many rows head h
    keeps in layer l (window included). With uniform head budgets every head keeps w_l; with
    adaptive ones a head keeping fewer repeats its last position (n - 1) to fill its row of
    ``kept`` (:func:`.heads.ragged_kept`), so a mask scattered from ``kept`` is exact.
    ``kept_per_layer`` (rows per head, averaged over heads) and ``kept_per_head`` [L][H] count
    the heads of every tensor-parallel rank.
    """

    prompt_len: int
    kept: list[torch.Tensor]
    counts: torch.Tensor
    kept_per_layer: list[int]
    kept_per_head: list[list[int]]

    def keep_mask(self) -> torch.Tensor:
        """[L, H, n] bool: True where (layer, head, position) is kept."""
        L = len(self.kept)
        H = self.kept[0].shape[0]
        mask = torch.zeros(L, H, self.prompt_len, dtype=torch.bool)
        for layer, pos in enumerate(self.kept):
            mask[layer].scatter_(1, pos.cpu(), True)
        return mask


def selection(prompt_len: int, kept: list[torch.Tensor], counts: torch.Tensor | None = None,
              reducer=LOCAL) -> Selection:
    """A :class:`Selection` from each layer's kept positions (``counts`` [L, H] when heads keep
    unequal numbers; every rank of a tensor-parallel group must call it: it gathers the counts)."""
    if counts is None:
        counts = torch.tensor([[k.shape[1]] * k.shape[0] for k in kept], dtype=torch.int64)
    every_head = reducer.gather(counts.t().contiguous()).t()  # [L, all heads]
    per_layer = every_head.sum(dim=1) // every_head.shape[1]
    return Selection(prompt_len, kept, counts, per_layer.tolist(), every_head.tolist())


def layer_kept(ranked: torch.Tensor, order: torch.Tensor, scale: torch.Tensor, per_head: int, n: int,
               cfg: PolicyConfig, reducer=LOCAL) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's kept positions [H, w] and rows per head [H] (window included), from each
    head's candidates best first (``ranked`` scores, ``order`` positions, [H, m]): the first
    ``per_head`` of every head, or with adaptive head budgets each head's own count, the heads
    competing on their scores over their ``scale`` ([H, R], :func:`.heads.head_scale`)."""
    heads = order.shape[0]
    if cfg.head_budgets != "uniform":
        counts = head_counts(ranked, scale, per_head, reducer)
    else:
        counts = torch.full((heads,), per_head, dtype=torch.int64)
    return ragged_kept(order, counts, n, cfg.window), counts + cfg.window


def update_points(num_layers: int, interval: int) -> list[int]:
    """Layers after which budgets are re-decided: every ``interval`` layers, and the last."""
    pts = [l for l in range(num_layers) if l % interval == interval - 1]
    if not pts or pts[-1] != num_layers - 1:
        pts.append(num_layers - 1)
    return pts


def update_budgets(
    held_scores: torch.Tensor,
    held: Sequence[int],
    base: int,
    num_layers: int,
    cap: int,
    reducer=LOCAL,
    allocation: str = "reference",
) -> list[int]:
    """One budget update over the layers seen so far (``allocation`` defaults to the paper's
    here; the server's default is PolicyConfig's).

    Args:
        held_scores: [L', H, bs] pooled scores of each seen layer's held rows, sorted
                     descending per head; only the first ``held[l]`` of layer l count.
        held:        rows per head each seen layer still holds.
        base:        budget per layer besides the window.
        num_layers:  L, all layers of the model (the budgets of the seen layers sum to base*L).
        cap:         n - ws, the most prefix rows a layer can keep.
        reducer:     the tensor-parallel group (:mod:`.reduce`); ``H`` is then this rank's
                     share of the heads, and the top-k runs over all ranks' heads.
        allocation:  ``reference`` and ``sinks``: c_l = winners_l // L' (the paper's code);
                     otherwise c_l = winners_l. ``floor`` and ``contrast`` (whose scores
                     select divided by each head's median) first give every seen layer
                     base // 5, ``sinks`` SINKS (its sink rows, at -inf here: see select).

    Returns:
        budget per seen layer: floor + (base*L - floor*L')*c_l/sum(c) floored, the
        remainder to the last seen layer, then capped at ``cap`` (floor is 0 but for
        ``floor``, ``contrast`` and ``sinks``). The global top-k (k = base * all heads * L') is exact: rows tying its
        k-th score count for the earliest layers first.
    """
    lp, h, bs = held_scores.shape
    masked = held_scores.clone()
    col = torch.arange(bs)
    for layer in range(lp):
        masked[layer, :, col >= held[layer]] = float("-inf")
    k = base * h * reducer.world * lp
    flat = masked.reshape(-1)
    best = reducer.gather(flat.topk(min(k, flat.numel())).values)
    kth = best.topk(min(k, best.numel())).values[-1]
    if torch.isfinite(kth):
        counts = reducer.sum((masked > kth).sum(dim=(1, 2)))
        # rows tying the k-th score fill the rest, earlier layers first
        ties = reducer.sum((masked == kth).sum(dim=(1, 2)))
        left = k - int(counts.sum())
        for layer in range(lp):
            take = min(left, int(ties[layer]))
            counts[layer] += take
            left -= take
    else:  # fewer than k rows held: every held row wins
        counts = reducer.sum(torch.isfinite(masked).sum(dim=(1, 2)))
    c = counts // lp if allocation in ("reference", "sinks") else counts
    floor = {"floor": base // 5, "contrast": base // 5, "sinks": min(SINKS, base)}.get(allocation, 0)
    total = base * num_layers - floor * lp
    if int(c.sum()) == 0:
        budgets = [total // lp] * lp
    else:
        budgets = (total * c // c.sum()).tolist()
    budgets[-1] += total - sum(budgets)
    return [min(b + floor, cap) for b in budgets]


def fill_surplus(kept: Sequence[int], budgets: Sequence[int], limit: int, total: int) -> list[int]:
    """Give ``total - sum(kept)`` rows to layers with room (< ``limit``), most-budgeted first."""
    out = list(kept)
    surplus = total - sum(out)
    for layer in sorted(range(len(out)), key=lambda l: (-budgets[l], l)):
        if surplus <= 0:
            break
        add = min(surplus, limit - out[layer])
        out[layer] += add
        surplus -= add
    return out


def select_dynamickv(layer_scores: Sequence[torch.Tensor], prompt_len: int, cfg: PolicyConfig,
                     reducer=LOCAL) -> Selection | None:
    """DynamicKV's kept rows for one request, or None when the prompt fits the budget.

    Args:
        layer_scores: per layer, [H, n - ws] window scores (unpooled) of the prefix tokens.
        prompt_len:   n.
        reducer:      the tensor-parallel group when ``H`` is one rank's share of the heads.
    """
    n, ws = prompt_len, cfg.window
    if n <= cfg.budget:
        return None
    num_layers = len(layer_scores)
    prefix = n - ws
    pooled = torch.stack([pool_scores(s.float().cpu(), cfg.kernel, cfg.pooling) for s in layer_scores])
    if cfg.allocation == "normalized":  # each layer's scores as shares of its own total (all ranks' heads)
        pooled = pooled / reducer.sum(pooled.sum(dim=(1, 2))).clamp_min(1e-30)[:, None, None]
    elif cfg.allocation == "contrast":  # each head's scores as multiples of its own typical (median) row
        pooled = pooled / typical_row(pooled)
    scale = head_scale(pooled, cfg.head_budgets)  # what adaptive heads' scores are divided by
    bs = min(cfg.rmax * cfg.base, prefix)
    sinks = min(SINKS, bs) if cfg.allocation == "sinks" else 0
    pooled[..., :sinks] = float("inf")  # the sinks first in every head (and in every head's count)
    # [L, H, bs] best first; ties (max pooling makes plateaus) keep the earlier position first
    held_scores, order = (t[..., :bs] for t in pooled.sort(dim=-1, descending=True, stable=True))
    counted = held_scores
    if sinks:  # ... but they win no layer budget
        counted = held_scores.clone()
        counted[..., :sinks] = float("-inf")

    held = [bs] * num_layers
    budgets = held
    for point in update_points(num_layers, cfg.update_interval):
        seen = point + 1
        budgets = update_budgets(counted[:seen], held[:seen], cfg.base, num_layers, prefix, reducer,
                                 cfg.allocation)
        for layer in range(seen):
            held[layer] = min(held[layer], budgets[layer])

    counts = fill_surplus(held, budgets, bs, cfg.base * num_layers) if cfg.fill_surplus else held
    layers = [layer_kept(held_scores[layer], order[layer], scale[layer], counts[layer], n, cfg, reducer)
              for layer in range(num_layers)]
    return selection(n, [k for k, _ in layers], torch.stack([c for _, c in layers]), reducer)


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


def select(layer_scores, prompt_len: int, config: PolicyConfig, reducer=LOCAL) -> Selection | None:
    chooser = {
        "dynamickv": select_dynamickv,
        "snapkv": select_snapkv,
        "pyramidkv": select_pyramidkv,
        "streamingllm": select_streamingllm,
    }[config.policy]
    return chooser(layer_scores, prompt_len, config, reducer)
