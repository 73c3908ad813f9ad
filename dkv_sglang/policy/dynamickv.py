"""DynamicKV's per-layer budgets and row selection for one request (pure torch).

Given each layer's window scores (see :mod:`.scoring`) for a prompt of ``n`` tokens, decide
which prompt tokens every (layer, KV head) keeps. The steps follow the paper's released code
(DESIGN.md section 4); each function here is one step so tests can check them on paper:

1. pool the scores (:func:`~.scoring.pool_scores`);
2. every layer first holds its top ``bs = min(rmax * base, n - ws)`` prefix tokens per head;
3. every ``m`` layers (and after the last), one global top-k over the rows held by the layers
   seen so far counts winners per layer and re-decides all their budgets
   (:func:`update_budgets`); a layer is cut to its budget, and the reference never grows it back;
4. what is kept: the first ``budget_l`` held tokens of each head, plus the window (with
   ``--kv-head-budgets adaptive`` the layer's heads share ``H x budget_l`` of their held
   tokens, :mod:`.heads`).

Our changes to the reference, each deliberate:
- one request at a time, so budgets never depend on the rest of the batch;
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
from dataclasses import dataclass

import torch

from .config import SINKS, PolicyConfig
from .heads import head_counts, head_scale, ragged_kept
from .reduce import LOCAL
from .scoring import pool_scores, typical_row


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


def select(layer_scores: Sequence[torch.Tensor], prompt_len: int, cfg: PolicyConfig, reducer=LOCAL) -> Selection | None:
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
