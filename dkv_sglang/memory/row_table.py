"""Which physical KV row holds each (layer, KV head, token): the bookkeeping of the shared pool.

Pure torch, no SGLang import. Vocabulary:

- a *head-row* is one KV head of one token of one layer: the unit the physical buffers hold,
  so every (layer, head) of a request can keep its own set of tokens;
- a *layer-row* ("row" in stats) is one token of one layer: ``H`` head-rows;
- a *token id* (``vid``) is what SGLang's ``req_to_token`` holds and its allocator hands out.
  It names a token of a request, not a place in memory: ``row_of[layer, head, vid]`` is the
  head-row holding it, or -1 once the policy dropped it there.
- the *hole* id (``num_ids + 1``) stands in ``req_to_token`` for a compressed request's tokens
  that no (layer, head) keeps: it holds no row anywhere, is shared by every request, and
  freeing it is a no-op. A compressed request therefore holds ids only for the tokens it
  keeps somewhere (at most ``budget x L x H`` of its prompt), not for its whole prompt.

All layers draw head-rows from one free list, so the memory one request drops in one layer is
available to any layer of any request. A new token takes ``L * H`` head-rows; freeing a token
id returns whatever head-rows it still holds. Row 0 and token id 0 are SGLang's padding slot:
``row_of[:, :, 0] == 0`` always, and head-row 0 is never handed out.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class HeadRows(NamedTuple):
    """One request's head-rows in one layer: ``rows[h, :lens[h]]`` are head h's, in token order;
    the rest of a row is padding (row 0, SGLang's padding slot, never attended to)."""

    rows: torch.Tensor  # [H, W] int64
    lens: torch.Tensor  # [H] int64

    @classmethod
    def packed(cls, rows: torch.Tensor, valid: torch.Tensor) -> HeadRows:
        """From [H, n] rows and a mask of the held ones: each head's held rows moved to the front."""
        heads, n = rows.shape
        if bool(valid.all()):
            return cls(rows.to(torch.int64), torch.full((heads,), n, dtype=torch.int64, device=rows.device))
        lens = valid.sum(dim=1)
        out = torch.zeros(heads, int(lens.max()) if heads else 0, dtype=torch.int64, device=rows.device)
        pos = torch.cumsum(valid.long(), dim=1) - 1
        head, tok = valid.nonzero(as_tuple=True)
        out[head, pos[head, tok]] = rows[head, tok].to(torch.int64)
        return cls(out, lens)

    @property
    def uniform(self) -> bool:
        """Every head holds as many rows (no padding)."""
        return bool((self.lens == self.rows.shape[1]).all())

    def mask(self) -> torch.Tensor:
        """[H, W] True where ``rows`` is a held row, False on padding."""
        return torch.arange(self.rows.shape[1], device=self.rows.device)[None, :] < self.lens[:, None]


class _Stack:
    """A free list of ids 1..n kept as a preallocated stack: O(k) to take or return k ids."""

    def __init__(self, n: int, device):
        self.capacity = n
        self.ids = torch.arange(1, n + 1, dtype=torch.int64, device=device)
        self.top = n  # ids[:top] are free

    def __len__(self) -> int:
        return self.top

    def take(self, k: int) -> torch.Tensor:
        assert 0 <= k <= self.top
        self.top -= k
        return self.ids[self.top : self.top + k].clone()

    def give(self, ids: torch.Tensor) -> None:
        k = ids.numel()
        assert self.top + k <= self.capacity, "more ids returned than were taken (double free)"
        self.ids[self.top : self.top + k] = ids.reshape(-1)
        self.top += k

    def reset(self) -> None:
        self.ids = torch.arange(1, self.capacity + 1, dtype=torch.int64, device=self.ids.device)
        self.top = self.capacity


def _compact(values: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """``values[mask]`` when the host knows it has ``count`` entries: a cumsum and one put, no
    wait for the device (the entries not taken all land in one scratch slot, then cut off)."""
    small = mask.numel() < 2**31
    place = torch.cumsum(mask, 0, dtype=torch.int32 if small else torch.int64)
    place.sub_(1).masked_fill_(~mask, count)
    out = values.new_empty(count + 1)
    out.index_put_((place,), values)
    return out[:count]


class RowTable:
    """Token ids -> head-rows, per (layer, head), over one pool of head-rows.

    Args:
        num_layers, num_heads: L and H (KV heads on this rank).
        num_tokens:  capacity in tokens of all layers; the pool has num_tokens*L*H head-rows.
        num_ids:     how many token ids may be alive at once (>= num_tokens: compressed
                     requests hold ids for tokens whose rows are gone).
    """

    def __init__(self, num_layers: int, num_heads: int, num_tokens: int, num_ids: int, device="cpu"):
        if num_ids < num_tokens:
            raise ValueError("num_ids must be >= num_tokens")
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.num_tokens = num_tokens
        self.num_rows = num_tokens * num_layers * num_heads
        self.rows = _Stack(self.num_rows, device)
        self._init_ids(num_ids, device)

    def _init_ids(self, num_ids: int, device) -> None:
        """Ids 1..num_ids, the padding id 0 (row 0) and the hole id num_ids + 1 (no row)."""
        self.ids = _Stack(num_ids, device)
        self.hole = num_ids + 1
        self.row_of = torch.full((self.num_layers, self.num_heads, num_ids + 2), -1, dtype=torch.int32, device=device)
        self.row_of[:, :, 0] = 0

    def _real(self, vids: torch.Tensor) -> torch.Tensor:
        """``vids`` flattened to int64, without the hole id (shared, never freed)."""
        vids = vids.reshape(-1).to(torch.int64)
        return vids[vids != self.hole]

    # -- capacity ---------------------------------------------------------------------------
    @property
    def head_rows_per_token(self) -> int:
        return self.num_layers * self.num_heads

    def free_head_rows(self) -> int:
        return len(self.rows)

    def free_layer_rows(self) -> int:
        return len(self.rows) // self.num_heads

    def free_tokens(self) -> int:
        """New tokens (all layers) that fit now: limited by head-rows and by token ids."""
        return min(len(self.rows) // self.head_rows_per_token, len(self.ids))

    # -- allocation -------------------------------------------------------------------------
    def alloc(self, n: int) -> torch.Tensor | None:
        """``n`` new token ids, each with a head-row in every (layer, head); None if full."""
        if n > self.free_tokens():
            return None
        vids = self.ids.take(n)
        rows = self.rows.take(n * self.head_rows_per_token)
        self.row_of[:, :, vids] = rows.view(self.num_layers, self.num_heads, n).to(torch.int32)
        return vids

    def free(self, vids: torch.Tensor) -> None:
        """Release token ids and every head-row they still hold (the hole id is skipped)."""
        vids = self._real(vids)
        if vids.numel() == 0:
            return
        held = self.row_of[:, :, vids]
        self.rows.give(held[held >= 0].to(torch.int64))
        self.row_of[:, :, vids] = -1
        self.ids.give(vids)

    def drop(self, vids: torch.Tensor, keep: torch.Tensor) -> int:
        """Free the head-rows of ``vids`` where ``keep`` [L, H, len(vids)] is False.

        Returns the number of head-rows freed (rows already dropped count zero).
        """
        vids = vids.reshape(-1).to(torch.int64)
        held = self.row_of[:, :, vids]
        gone = (~keep.to(held.device)) & (held >= 0)
        freed = held[gone].to(torch.int64)
        self.rows.give(freed)
        held[gone] = -1
        self.row_of[:, :, vids] = held
        return int(freed.numel())

    def release_unheld(self, vids: torch.Tensor) -> torch.Tensor:
        """Give back the ids of ``vids`` that no (layer, head) holds a row for any more (a
        compressed request's dropped tokens); returns ``vids`` with those replaced by the hole."""
        vids = vids.reshape(-1).to(torch.int64)
        unheld = (self.row_of[:, :, vids] < 0).flatten(0, 1).all(dim=0) & (vids != self.hole) & (vids != 0)
        if bool(unheld.any()):
            self.ids.give(vids[unheld])
            vids = torch.where(unheld, torch.full_like(vids, self.hole), vids)
        return vids

    def cut(self, vids: torch.Tensor, keep: torch.Tensor, freed: int, released: int) -> torch.Tensor:
        """:meth:`drop` then :meth:`release_unheld` of a freshly prefilled sequence (every row of
        ``vids`` held), without waiting for the device: the caller knows on the host how many
        head-rows go (``freed``: ``keep``'s False entries) and how many tokens no (layer, head)
        keeps (``released``). Returns ``vids`` with those tokens replaced by the hole."""
        vids = vids.reshape(-1).to(torch.int64)
        held = self.row_of[:, :, vids]
        gone = ~keep.to(held.device)
        self.rows.give(_compact(held.reshape(-1), gone.reshape(-1), freed))  # int32: the stack widens it
        self.row_of[:, :, vids] = torch.where(gone, torch.full_like(held, -1), held)
        unheld = gone.flatten(0, 1).all(dim=0)
        self.ids.give(_compact(vids, unheld, released))
        return torch.where(unheld, torch.full_like(vids, self.hole), vids)

    def fork_need(self, vids: torch.Tensor, keep: torch.Tensor) -> tuple[int, int]:
        """(head-rows, token ids) that :meth:`fork` of ``vids`` under ``keep`` takes."""
        kept = keep.to(self.row_of.device) & (self.row_of[:, :, vids.reshape(-1).to(torch.int64)] >= 0)
        return int(kept.sum()), int(kept.flatten(0, 1).any(dim=0).sum())

    def fork(self, vids: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """New token ids holding fresh copies of the head-rows of ``vids`` that ``keep``
        [L, H, len(vids)] keeps; ``vids`` themselves are untouched (someone else owns them:
        SGLang's prefix cache). A token kept nowhere gets the hole id. Returns (new ids,
        source rows, destination rows) for the caller to copy the K/V bytes, or None when
        the rows or ids are not free.
        """
        vids = vids.reshape(-1).to(torch.int64)
        held = self.row_of[:, :, vids]
        kept = keep.to(held.device) & (held >= 0)
        somewhere = kept.flatten(0, 1).any(dim=0)
        k, n = int(kept.sum()), int(somewhere.sum())
        if k > len(self.rows) or n > len(self.ids):
            return None
        new_vids = torch.full_like(vids, self.hole)
        new_vids[somewhere] = self.ids.take(n)
        dst = self.rows.take(k)
        rows = torch.full_like(held, -1)
        rows[kept] = dst.to(torch.int32)
        self.row_of[:, :, new_vids[somewhere]] = rows[:, :, somewhere]
        return new_vids, held[kept].to(torch.int64), dst

    def reset(self) -> None:
        self.rows.reset()
        self.ids.reset()
        self.row_of.fill_(-1)
        self.row_of[:, :, 0] = 0

    # -- lookup -----------------------------------------------------------------------------
    def write_rows(self, layer: int, vids: torch.Tensor) -> torch.Tensor:
        """[len(vids) * H] head-rows to write token-major ([T, H] flattened) in ``layer``."""
        return self.row_of[layer][:, vids].t().reshape(-1).to(torch.int64)

    def kept_rows(self, layer: int, vids: torch.Tensor) -> HeadRows:
        """The head-rows ``layer`` still holds for ``vids``, each head's in token order (heads
        may keep unequal numbers: ``--kv-head-budgets adaptive``)."""
        rows = self.row_of[layer][:, vids]
        return HeadRows.packed(rows, rows >= 0)

    def held_per_head(self, vids: torch.Tensor) -> torch.Tensor:
        """[L, H] tokens each (layer, head) holds for ``vids``."""
        return (self.row_of[:, :, vids] >= 0).sum(dim=2)
