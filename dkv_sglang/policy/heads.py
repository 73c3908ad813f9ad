"""Per-head budgets inside one layer: Ada-KV's allocation (pure torch, no SGLang).

With ``--kv-head-budgets uniform`` every KV head of a layer keeps the layer's count of prefix
rows. With ``adaptive`` the heads of a layer share ``H x count`` rows: every head first keeps
its best ``floor(ALPHA x count)`` rows (Ada-KV's safeguard, so no head is left blind), and the
rest go to one top-k over all heads' remaining scores, so a head whose attention is spread keeps
more rows than a head that looks at a few tokens. The layer's total, and so the request's, is
unchanged: the budgets still sum to ``budget x L x H``.

Heads compete on contrast, not raw mass: each head's scores divided by its own typical (median) row
(:func:`.scoring.typical_row`; :func:`.dynamickv.layer_kept` divides). On raw mass (Ada-KV's
choice), a head that pours its window's attention into a sink leaves its other rows tiny and loses
them to heads that spread theirs; on SmolLM2 that left SnapKV+adaptive copying only the first digits
of a 7-digit needle, in the server and in a transformers reference with the same keep mask alike
(docs/decisions.md, "Adaptive head budgets compete on contrast, not raw mass", 2026-12-03).
Dividing by a per-head factor leaves each head's own order unchanged.

Contrast favours heavy-tailed heads, though: a head that looks at a few tokens has a low median, so
even its middling rows stand far above it, and it outbids a head whose attention is spread
(``shares`` measures the other way: docs/allocations.md, its screens of 2026-12-04). ``shares``
divides each head's scores by its total over the prefix less the first SINKS rows: every head has
the same mass to share out, as on raw mass (Ada-KV's, which gives spread heads more rows), but a
sink no longer shrinks the rest.

``max`` funds a head that either rule funds (docs/decisions.md, 2026-12-04): each head's count is
the larger of its contrast and shares counts, renormalised above the floor so the layer's total is
unchanged (:func:`larger_counts`).
"""

from __future__ import annotations

import torch

from .config import HEAD_RULES, SINKS
from .reduce import LOCAL
from .scoring import typical_row

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
