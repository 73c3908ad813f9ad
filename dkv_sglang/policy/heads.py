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
import torch.nn.functional as F

from .config import HEAD_RULES, SINKS
from .ranking import EXCLUDED, item_of, rank_keys
from .reduce import LOCAL
from .scoring import typical_row

ALPHA = 0.2  # Ada-KV's default safeguard share


def safeguard(per_head):
    """floor(ALPHA x per_head): the rows every head keeps whatever the others score (an int
    for an int, elementwise for an int64 tensor)."""
    if isinstance(per_head, int):
        return int(ALPHA * per_head)
    return (per_head.to(torch.float64) * ALPHA).to(torch.int64)


def head_scale(pooled: torch.Tensor, mode: str, median: torch.Tensor | None = None) -> torch.Tensor:
    """[..., H, R] what each head's pooled prefix scores ([..., H, m]) are divided by before its
    heads compete, one column per rule the mode counts with (``HEAD_RULES``): the median row
    (``adaptive``), the mass past the first SINKS rows (``shares``), or both (``max``); one
    column of 1 for ``uniform``, where heads do not compete. ``median`` ([..., H, 1]): each
    head's median row, when the caller knows it."""
    columns = [typical_row(pooled, median) if rule == "adaptive" else RULE_SCALES[rule](pooled)
               for rule in HEAD_RULES[mode]]
    return torch.cat(columns, dim=-1) if columns else torch.ones_like(pooled[..., :1])


def mass_past_sinks(pooled: torch.Tensor) -> torch.Tensor:
    """[..., 1] each head's pooled mass outside the first SINKS rows (``shares``' scale)."""
    rest = pooled[..., SINKS:] if pooled.shape[-1] > SINKS else pooled
    return rest.sum(dim=-1, keepdim=True).clamp_min(1e-30)


RULE_SCALES = {"adaptive": typical_row, "shares": mass_past_sinks}  # a rule's name -> what its heads' scores are over


def head_rows(ranked: torch.Tensor, scale: torch.Tensor, per_head: torch.Tensor, most: int, mode: str,
              reducer=LOCAL) -> torch.Tensor:
    """[R, L, H] prefix rows each head keeps when every (request, layer) keeps ``per_head``
    ([R, L] int64, at most ``most``) rows per head on average.

    ``uniform``: each head ``per_head``. Otherwise one :func:`adaptive_rows` per column of
    ``scale`` ([R, L, H, C], :func:`head_scale`), the heads' candidate scores ``ranked``
    ([R, L, H, m], best first) divided by it; with two columns, each head the larger of its two
    counts (:func:`larger_rows`).
    """
    if mode == "uniform":
        return per_head[..., None].expand(ranked.shape[:-1]).clone()
    counts = [adaptive_rows(ranked / scale[..., r : r + 1], per_head, most, reducer) for r in range(scale.shape[-1])]
    return counts[0] if len(counts) == 1 else larger_rows(counts, per_head, reducer)


def adaptive_rows(ranked: torch.Tensor, per_head: torch.Tensor, most: int, reducer=LOCAL) -> torch.Tensor:
    """Rows each head keeps when the heads of a (request, layer) share ``H x per_head``.

    Args:
        ranked:   [R, L, H, m] each head's candidate scores relative to its typical row, sorted
                  descending (m >= per_head).
        per_head: [R, L] int64, the uniform count; ``most`` bounds it (a host int).
        reducer:  the tensor-parallel group: ``H`` is this rank's share of the heads, and the
                  top-k runs over all ranks' heads (one gather for the whole batch).

    Returns:
        [R, L, H] int64 counts, each in [floor(ALPHA*per_head), m], summing over all ranks'
        heads to ``per_head x`` all heads: each head's first floor(ALPHA*per_head) rows, then one
        top-k over the rest of all heads, rows tying the k-th score to earlier heads (rank order).
    """
    *lead, heads, m = ranked.shape
    every = heads * reducer.world
    first = heads * reducer.rank
    floor = safeguard(per_head)
    k = (per_head - floor) * every
    kmax = (most - safeguard(most)) * every
    if kmax == 0:
        return floor[..., None].expand(*lead, heads).clone()
    device = ranked.device
    keys = rank_keys(ranked, torch.arange(first, first + heads, device=device)[:, None])
    keys = keys.masked_fill(torch.arange(m, device=device) < floor[..., None, None], EXCLUDED).flatten(-2)
    best = keys.topk(min(kmax, keys.shape[-1]), dim=-1).values
    if reducer.world > 1:
        best = reducer.gather(best, dim=-1)
        best = best.topk(min(kmax, best.shape[-1]), dim=-1).values
    won = torch.arange(best.shape[-1], device=device) < k[..., None]
    head = torch.where(won, item_of(best), 0)
    wins = torch.zeros(*lead, every, dtype=torch.int64, device=device).scatter_add_(-1, head, won.long())
    return floor[..., None] + wins[..., first : first + heads]


def larger_rows(counts: list[torch.Tensor], per_head: torch.Tensor, reducer=LOCAL) -> torch.Tensor:
    """[R, L, H] each head's larger count of ``counts`` (each [R, L, H], summing over all
    ranks' heads to ``per_head x`` all heads), scaled down to that same total: every head keeps
    the floor ``floor(ALPHA*per_head)``, and the rest go in proportion to each head's larger
    count above the floor, in integers (largest remainder, ties to the earlier head in rank
    order), so every rank computes the same counts. No head gets more than its larger count."""
    heads = counts[0].shape[-1]
    larger = reducer.gather(torch.stack(counts).amax(dim=0), dim=-1)  # every rank's heads, rank by rank
    every = larger.shape[-1]
    floor = safeguard(per_head)[..., None]
    above = larger - floor
    rest = (per_head[..., None] - floor) * every
    total = above.sum(dim=-1, keepdim=True)
    spread = above * rest
    share, remainder = spread // total.clamp_min(1), spread % total.clamp_min(1)
    left = rest - share.sum(dim=-1, keepdim=True)  # fewer than the heads: one more each for the largest remainders
    mine, theirs = remainder[..., :, None], remainder[..., None, :]
    head = torch.arange(every, device=larger.device)
    ahead = ((theirs > mine) | ((theirs == mine) & (head < head[:, None]))).sum(dim=-1)
    share = (share + (ahead < left)).masked_fill(total == 0, 0)
    return floor + share[..., reducer.rank * heads : (reducer.rank + 1) * heads]


def kept_positions(order: torch.Tensor, counts: torch.Tensor, n: int, window: int) -> torch.Tensor:
    """[..., H, m + window] ascending positions each head keeps: the first ``counts`` ([..., H])
    prefix positions of ``order`` ([..., H, m], best first), then the window, then ``n - 1`` (its
    last window position) repeated to the common width, so scattering the positions into a mask
    gives exactly each head's rows."""
    m = order.shape[-1]
    device = order.device
    chosen = torch.where(torch.arange(m, device=device) < counts[..., None], order, n).sort(dim=-1).values
    col = torch.arange(m + window, device=device)
    after = (n - window + col - counts[..., None]).clamp_max(n - 1)  # the window, then n - 1
    return torch.where(col < counts[..., None], F.pad(chosen, (0, window), value=n), after)


def adaptive_counts(ranked: torch.Tensor, per_head: int, reducer=LOCAL) -> torch.Tensor:
    """[H] :func:`adaptive_rows` of one layer ([H, m] ``ranked``, an int ``per_head``)."""
    if per_head > ranked.shape[-1]:
        raise ValueError(f"{per_head} rows per head asked of {ranked.shape[-1]} candidates")
    wanted = torch.full((1, 1), per_head, dtype=torch.int64, device=ranked.device)
    return adaptive_rows(ranked[None, None], wanted, per_head, reducer)[0, 0]


def larger_counts(counts: list[torch.Tensor], per_head: int, reducer=LOCAL) -> torch.Tensor:
    """[H] :func:`larger_rows` of one layer ([H] counts, an int ``per_head``)."""
    wanted = torch.full((1, 1), per_head, dtype=torch.int64, device=counts[0].device)
    return larger_rows([c[None, None] for c in counts], wanted, reducer)[0, 0]


def ragged_kept(order: torch.Tensor, counts: torch.Tensor, n: int, window: int) -> torch.Tensor:
    """[H, w] :func:`kept_positions` of one layer, cut to its widest head (w = the largest
    count + window)."""
    width = int(counts.max()) if order.shape[0] else 0
    return kept_positions(order, counts, n, window)[:, : width + window]
