"""DynamicKV's per-layer budgets and row selection (pure torch, batched over requests).

Given each layer's window scores (see :mod:`.scoring`) for requests with prompts of ``n``
tokens, decide which prompt tokens every (request, layer, KV head) keeps. Everything runs on
the scores' device as a fixed number of tensor ops per batch, whatever ``n`` or the number of
requests, and reads nothing back to the host; the only loop is over the update points of step
3. The steps follow the paper's released code (DESIGN.md section 4); each function here is one
step so tests can check them on paper:

1. pool the scores (:func:`~.scoring.pool_scores`);
2. every layer first holds its top ``bs = min(rmax * base, n - ws)`` prefix tokens per head;
3. every ``m`` layers (and after the last), one global top-k over the rows held by the layers
   seen so far counts winners per layer and re-decides all their budgets
   (:func:`layer_budgets`); a layer is cut to its budget, and the reference never grows it back;
4. what is kept: the first ``budget_l`` held tokens of each head, plus the window (with
   ``--kv-head-budgets adaptive`` the layer's heads share ``H x budget_l`` of their held
   tokens, :mod:`.heads`).

Our changes to the reference, each deliberate:
- budgets per request, so they never depend on the rest of the batch;
- rows per KV head (scores of a query group combined), not per query head;
- the default ``--kv-allocation`` is ``contrast``, not the paper's ``reference`` (step 3 with
  each head's scores divided by its median row and every layer first given base // 5: issue
  14's measurements, README "Allocations");
- ``fill_surplus``: budget a layer cannot use (cut earlier, or capped by ``n - ws``) goes to
  layers with room instead of being dropped or padded with duplicate window rows, so every
  compressed request keeps exactly ``budget * L`` rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .config import SINKS, PolicyConfig
from .heads import head_rows, head_scale, kept_positions
from .ranking import LOW, NEG_INF, item_of, rank_keys, top_rows
from .reduce import LOCAL
from .scoring import pool_scores, typical_row
from .selection import Selection  # re-exported: its home before selection.py

__all__ = ["Selection", "choose", "fill_surplus", "fill_surplus_rows", "layer_budgets", "update_budgets",
           "update_points"]


def update_points(num_layers: int, interval: int) -> list[int]:
    """Layers after which budgets are re-decided: every ``interval`` layers, and the last."""
    pts = [l for l in range(num_layers) if l % interval == interval - 1]
    if not pts or pts[-1] != num_layers - 1:
        pts.append(num_layers - 1)
    return pts


def layer_budgets(
    held_keys: torch.Tensor,
    held: torch.Tensor,
    base: int,
    num_layers: int,
    cap: int,
    reducer=LOCAL,
    allocation: str = "reference",
) -> torch.Tensor:
    """One budget update over the layers seen so far, for every request of a batch
    (``allocation`` defaults to the paper's here; the server's default is PolicyConfig's).

    Args:
        held_keys:   [R, L', H, bs] :func:`~.ranking.rank_keys` of each seen layer's held rows'
                     pooled scores (ties broken by layer), sorted descending per head; only the
                     first ``held[r, l]`` of layer l count.
        held:        [R, L'] int64 rows per head each seen layer still holds.
        base:        budget per layer besides the window.
        num_layers:  L, all layers of the model (the budgets of the seen layers sum to base*L).
        cap:         n - ws, the most prefix rows a layer can keep.
        reducer:     the tensor-parallel group (:mod:`.reduce`); ``H`` is then this rank's
                     share of the heads, and the top-k runs over all ranks' heads (one gather).
        allocation:  ``reference`` and ``sinks``: c_l = winners_l // L' (the paper's code);
                     otherwise c_l = winners_l. ``floor`` and ``contrast`` (whose scores
                     choose divides by each head's median) first give every seen layer
                     base // 5, ``sinks`` SINKS (its sink rows, at -inf here: see choose).

    Returns:
        [R, L'] int64 budget per seen layer: floor + (base*L - floor*L')*c_l/sum(c) floored,
        the remainder to the last seen layer, then capped at ``cap`` (floor is 0 but for
        ``floor``, ``contrast`` and ``sinks``). The global top-k (k = base * all heads * L') is
        exact: rows tying its k-th score count for the earliest layers first; when fewer than k
        rows are finite, every finite held row wins. Scores must be below +inf.
    """
    requests, lp, _, bs = held_keys.shape
    k = base * held_keys.shape[2] * reducer.world * lp
    device = held_keys.device
    layer = torch.arange(lp, device=device)
    dropped = NEG_INF * 2**32 + (LOW - layer)  # rank_keys(-inf, layer): a row the layer no longer holds
    keys = torch.where(torch.arange(bs, device=device) < held[..., None, None], held_keys, dropped[:, None, None])
    keys = keys.reshape(requests, -1)
    best = keys.topk(min(k, keys.shape[1]), dim=1, sorted=False).values
    if reducer.world > 1:
        best = reducer.gather(best, dim=1)
        best = best.topk(min(k, best.shape[1]), dim=1, sorted=False).values
    finite = ((best >> 32) > NEG_INF).long()  # -inf rows (dropped, or sinks) win nothing
    counts = torch.zeros(requests, lp, dtype=torch.int64, device=device).scatter_add_(1, item_of(best), finite)
    c = counts // lp if allocation in ("reference", "sinks") else counts
    floor = {"floor": base // 5, "contrast": base // 5, "sinks": min(SINKS, base)}.get(allocation, 0)
    total = base * num_layers - floor * lp
    signal = c.sum(dim=1, keepdim=True)
    budgets = torch.where(signal == 0, total // lp, total * c // signal.clamp_min(1))
    budgets[:, -1] += total - budgets.sum(dim=1)
    return (budgets + floor).clamp_max(cap)


def update_budgets(
    held_scores: torch.Tensor,
    held: Sequence[int],
    base: int,
    num_layers: int,
    cap: int,
    reducer=LOCAL,
    allocation: str = "reference",
) -> list[int]:
    """:func:`layer_budgets` of one request, from its held scores ([L', H, bs], sorted
    descending per head) and rows held per layer (ints); the budgets as ints."""
    lp = held_scores.shape[0]
    keys = rank_keys(held_scores, torch.arange(lp, device=held_scores.device)[:, None, None])
    rows = torch.tensor([list(held)], dtype=torch.int64, device=held_scores.device)
    return layer_budgets(keys[None], rows, base, num_layers, cap, reducer, allocation)[0].tolist()


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


def fill_surplus_rows(kept: torch.Tensor, budgets: torch.Tensor, limit: int, total: int) -> torch.Tensor:
    """:func:`fill_surplus` for every request at once ([R, L] int64 ``kept`` and ``budgets``,
    every layer's room ``limit - kept`` >= 0): layers ordered by (-budget, layer), each taking
    what is left of the surplus after the layers before it, up to its room."""
    surplus = total - kept.sum(dim=1, keepdim=True)
    order = budgets.sort(dim=1, descending=True, stable=True).indices
    room = (limit - kept).gather(1, order)
    before = room.cumsum(dim=1) - room
    return kept.scatter_add(1, order, torch.minimum((surplus - before).clamp_min(0), room))


def choose(
    scores: torch.Tensor, prompt_len: int, cfg: PolicyConfig, reducer=LOCAL
) -> tuple[torch.Tensor, torch.Tensor]:
    """DynamicKV's kept rows for requests whose prompts are ``prompt_len`` > ``cfg.budget`` tokens.

    Args:
        scores:     [R, L, H, n - ws] window scores (unpooled, any float dtype) of the prefix tokens.
        prompt_len: n.
        reducer:    the tensor-parallel group when ``H`` is one rank's share of the heads.

    Returns:
        positions [R, L, H, bs + ws] int64 (:func:`.heads.kept_positions`, bs = min(rmax*base,
        n - ws)) and counts [R, L, H] int64, rows each head keeps (window included).
    """
    n, ws = prompt_len, cfg.window
    requests, num_layers, _, prefix = scores.shape
    pooled = pool_scores(scores.float(), cfg.kernel, cfg.pooling)
    if cfg.allocation == "normalized":  # each layer's scores as shares of its own total (all ranks' heads)
        pooled.div_(reducer.sum(pooled.sum(dim=(2, 3))).clamp_min(1e-30)[..., None, None])
    median = None
    if cfg.allocation == "contrast":  # each head's scores as multiples of its own typical (median) row
        median = pooled.median(dim=-1, keepdim=True).values
        typical = typical_row(pooled, median)
        pooled, median = pooled.div_(typical), median / typical  # a positive divisor keeps the median row
    scale = head_scale(pooled, cfg.head_budgets, median)  # what adaptive heads' scores are divided by
    bs = min(cfg.rmax * cfg.base, prefix)
    sinks = min(SINKS, bs) if cfg.allocation == "sinks" else 0
    if sinks:  # the sinks first in every head (and in every head's count)
        pooled[..., :sinks] = float("inf")
    # [R, L, H, bs] best first; ties (max pooling makes plateaus) keep the earlier position first
    held_scores, order = top_rows(pooled, bs)
    counted = held_scores
    if sinks:  # ... but they win no layer budget
        counted = held_scores.clone()
        counted[..., :sinks] = float("-inf")
    keys = rank_keys(counted, torch.arange(num_layers, device=scores.device)[:, None, None])

    held = torch.full((requests, num_layers), bs, dtype=torch.int64, device=scores.device)
    budgets = held
    for point in update_points(num_layers, cfg.update_interval):
        seen = point + 1
        budgets = layer_budgets(keys[:, :seen], held[:, :seen], cfg.base, num_layers, prefix, reducer, cfg.allocation)
        held[:, :seen] = torch.minimum(held[:, :seen], budgets)

    per_head = fill_surplus_rows(held, budgets, bs, cfg.base * num_layers) if cfg.fill_surplus else held
    counts = head_rows(held_scores, scale, per_head, bs, cfg.head_budgets, reducer)
    return kept_positions(order, counts, n, ws), counts + ws
