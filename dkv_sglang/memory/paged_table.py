"""The row table with head-rows grouped in physical pages of ``P`` rows (``--page-size P``).

Pure torch, no SGLang import. Same vocabulary as :mod:`row_table`; in addition an *entry* is
one (request, layer, KV head): the rows FlashInfer reads as one batch entry. Here a page belongs
to one entry and holds that entry's tokens in position order, so each entry is a list of pages
of which only the last may be partly filled (FlashInfer's indptr / indices / last_page_len).

SGLang still sees one token id per token (its page size stays 1). Its allocator hands out ids
for a whole batch without saying which request they are for, so :meth:`alloc` only reserves
ids; the scheduler hook then calls :meth:`place` with each request's previous token id, and the
new tokens go after it: into the free slots of the page holding that token's row, then into
fresh pages. After compression :meth:`drop` packs each entry's kept rows into the first pages it
already holds (the caller's ``move`` copies K/V) and frees the rest, so an entry never holds
more than one partly filled page.

Capacity (:meth:`free_tokens`) counts whole free pages only: the free slots of a partly filled
page belong to its entry. A request may need up to one page per (layer, head) more than its
tokens fill; the allocator charges that at admission (``request_slot_reserve``).

Page 0 (rows 0..P-1) is never handed out: row 0 is SGLang's padding slot. Not supported (yet):
:meth:`fork` (SGLang's radix prefix cache with a compressing policy).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .row_table import RowTable, _Stack

UNPLACED = -2  # row_of value of an id that was allocated but not placed yet


class PagedRowTable(RowTable):
    """Token ids -> head-rows, with each (request, layer, head)'s rows in its own pages.

    Args: as :class:`RowTable`, plus ``page_size`` (P > 1). The pool has
    ``ceil(num_tokens * L * H / P)`` pages; buffers need ``num_rows + 1`` rows (a multiple of P).
    """

    def __init__(self, num_layers: int, num_heads: int, num_tokens: int, num_ids: int, page_size: int, device="cpu"):
        if num_ids < num_tokens:
            raise ValueError("num_ids must be >= num_tokens")
        if page_size < 2:
            raise ValueError("PagedRowTable is for page_size > 1; use RowTable")
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.num_tokens = num_tokens
        self.page_size = page_size
        self.num_pages = -(-num_tokens * num_layers * num_heads // page_size)
        self.num_rows = (self.num_pages + 1) * page_size - 1  # rows 1..num_rows; page 0 reserved
        self.pages = _Stack(self.num_pages, device)
        self._init_ids(num_ids, device)
        # slots handed out in each page (its entry's next row is page * P + used), and still held
        self.used = torch.zeros(self.num_pages + 1, dtype=torch.int64, device=device)
        self.live = torch.zeros(self.num_pages + 1, dtype=torch.int64, device=device)
        self.unplaced = 0  # ids allocated and not placed yet (host count)
        # copies K/V rows: move(src, dst), both [k] int64; set by the pool
        self.move: Callable[[torch.Tensor, torch.Tensor], None] | None = None

    # -- capacity ---------------------------------------------------------------------------
    def free_head_rows(self) -> int:
        return len(self.pages) * self.page_size

    def free_layer_rows(self) -> int:
        return min(self.free_head_rows() // self.num_heads, self.num_tokens * self.num_layers)

    def free_tokens(self) -> int:
        """New tokens (all layers) that whole free pages hold, less ids not placed yet."""
        by_rows = self.free_head_rows() // self.head_rows_per_token - self.unplaced
        return max(0, min(by_rows, len(self.ids), self.num_tokens - self.unplaced))

    # -- allocation -------------------------------------------------------------------------
    def alloc(self, n: int) -> torch.Tensor | None:
        """``n`` new token ids, not placed yet (:meth:`place` gives them rows); None if full."""
        if n > self.free_tokens():
            return None
        vids = self.ids.take(n)
        self.row_of[:, :, vids] = UNPLACED
        self.unplaced += n
        return vids

    def place(self, prev: torch.Tensor, counts: list[int], vids: torch.Tensor) -> None:
        """Give rows to new token ids, request by request.

        Args:
            prev:   [B] each request's token id just before its new ones (0: none, a new request).
            counts: [B] new tokens per request.
            vids:   [sum(counts)] the new ids, request-major, each request's in position order.

        In every (layer, head) a request's new tokens fill the free slots of the page holding
        ``prev``'s row (when that row is the page's last one used), then fresh pages.
        """
        device = self.row_of.device
        num_b, lh, p = len(counts), self.head_rows_per_token, self.page_size
        total = sum(counts)
        if total == 0:
            return
        prev = prev.reshape(-1).to(device=device, dtype=torch.int64)
        vids = vids.reshape(-1).to(device=device, dtype=torch.int64)
        n_req = torch.tensor(counts, dtype=torch.int64, device=device)
        # entries e = b * L * H + layer * H + head
        tail = self.row_of[:, :, prev].permute(2, 0, 1).reshape(-1).long()
        has_tail = (tail >= 0) & (prev != 0).repeat_interleave(lh)
        tail_page = torch.where(has_tail, tail // p, torch.zeros_like(tail))
        tail_used = self.used[tail_page]
        appendable = has_tail & (tail % p == tail_used - 1) & (tail_used < p)
        n = n_req.repeat_interleave(lh)
        room = torch.minimum(torch.where(appendable, p - tail_used, torch.zeros_like(tail)), n)
        rest = n - room
        need = (rest + p - 1) // p
        num_new = int(need.sum())
        if num_new > len(self.pages):
            raise MemoryError(f"dkv pool: {num_new} pages needed, {len(self.pages)} free")
        new = self.pages.take(num_new)
        new_ext = torch.cat([new, new.new_zeros(1)])
        base = torch.cumsum(need, 0) - need
        # every (entry, token)
        num_e = num_b * lh
        ent = torch.repeat_interleave(torch.arange(num_e, device=device), n, output_size=total * lh)
        first = torch.cumsum(n, 0) - n
        j = torch.arange(total * lh, device=device) - first[ent]
        jj = j - room[ent]
        in_tail = jj < 0
        page_new = new_ext[torch.where(in_tail, torch.full_like(jj, num_new), base[ent] + jj.clamp(min=0) // p)]
        row = torch.where(in_tail, tail_page[ent] * p + tail_used[ent] + j, page_new * p + jj.clamp(min=0) % p)
        b, e_lh = ent // lh, ent % lh
        starts = torch.cumsum(n_req, 0) - n_req
        self.row_of[e_lh // self.num_heads, e_lh % self.num_heads, vids[starts[b] + j]] = row.to(torch.int32)
        grew = room > 0
        self.used.index_add_(0, tail_page[grew], room[grew])
        self.live.index_add_(0, tail_page[grew], room[grew])
        if num_new:
            owner = torch.repeat_interleave(torch.arange(num_e, device=device), need, output_size=num_new)
            k = torch.arange(num_new, device=device) - base[owner]
            fill = (rest[owner] - k * p).clamp(max=p)
            self.used[new] = fill
            self.live[new] = fill
        self.unplaced -= total

    def _release(self, rows: torch.Tensor) -> None:
        """Rows no longer held; pages left with none go back to the free list."""
        if rows.numel() == 0:
            return
        pages = rows.reshape(-1).long() // self.page_size
        self.live.index_add_(0, pages, torch.full_like(pages, -1))
        touched = torch.unique(pages)
        empty = touched[self.live[touched] == 0]
        self.used[empty] = 0
        self.pages.give(empty)

    def free(self, vids: torch.Tensor) -> None:
        """Release token ids and every head-row they still hold (the hole id is skipped)."""
        vids = self._real(vids)
        if vids.numel() == 0:
            return
        held = self.row_of[:, :, vids]
        self.unplaced -= int((held[0, 0] == UNPLACED).sum())
        self._release(held[held >= 0])
        self.row_of[:, :, vids] = -1
        self.ids.give(vids)

    def drop(self, vids: torch.Tensor, keep: torch.Tensor) -> int:
        """Free the head-rows of ``vids`` where ``keep`` [L, H, len(vids)] is False, then pack
        the kept rows into the first pages each entry holds.

        ``vids`` must be all the tokens a request holds, in position order (its pages hold
        nothing else). Returns the number of head-rows freed.
        """
        vids = vids.reshape(-1).to(torch.int64)
        held = self.row_of[:, :, vids]
        gone = (~keep.to(held.device)) & (held >= 0)
        freed = held[gone]
        held[gone] = -1
        self.row_of[:, :, vids] = held
        self._release(freed)
        self._pack(vids)
        return int(freed.numel())

    def _pack(self, vids: torch.Tensor) -> None:
        """Move each entry's rows of ``vids`` to the front of the pages it holds, in order."""
        p, lh = self.page_size, self.head_rows_per_token
        held = self.row_of[:, :, vids].reshape(lh, -1).long()
        mask = held >= 0
        src = held[mask]  # entry-major, position order
        if src.numel() == 0:
            return
        device = src.device
        k = mask.sum(dim=1)
        ent = torch.repeat_interleave(torch.arange(lh, device=device), k, output_size=src.numel())
        page = src // p
        # an entry's pages, in the order its rows reach them (each page is one run of its rows)
        run_start = torch.ones_like(page, dtype=torch.bool)
        run_start[1:] = (page[1:] != page[:-1]) | (ent[1:] != ent[:-1])
        own = page[run_start]
        runs = torch.bincount(ent[run_start], minlength=lh)
        first_run = torch.cumsum(runs, 0) - runs
        j = torch.arange(src.numel(), device=device) - (torch.cumsum(k, 0) - k)[ent]
        dst = own[first_run[ent] + j // p] * p + j % p
        moved = src != dst
        if bool(moved.any()):
            if self.move is None:
                raise RuntimeError("PagedRowTable.move is not set: cannot copy K/V rows")
            self.move(src[moved], dst[moved])
        held[mask] = dst
        self.row_of[:, :, vids] = held.view(self.num_layers, self.num_heads, -1).to(torch.int32)
        # page counters: the first ceil(k / P) pages of each entry are full but the last
        run_ent = ent[run_start]
        q = torch.arange(own.numel(), device=device) - first_run[run_ent]
        fill = (k[run_ent] - q * p).clamp(min=0, max=p)
        self.used[own] = fill
        self.live[own] = fill
        empty = own[fill == 0]
        if empty.numel():
            self.pages.give(empty)

    def fork(self, vids, keep):
        raise NotImplementedError("dkv-sglang: copying rows for the radix cache needs --page-size 1")

    def reset(self) -> None:
        self.pages.reset()
        self.ids.reset()
        self.row_of.fill_(-1)
        self.row_of[:, :, 0] = 0
        self.used.zero_()
        self.live.zero_()
        self.unplaced = 0

    # -- lookup -----------------------------------------------------------------------------
    def write_rows(self, layer: int, vids: torch.Tensor) -> torch.Tensor:
        if self.unplaced:
            raise RuntimeError(
                f"dkv pool: {self.unplaced} token ids have no rows yet (page size {self.page_size} places "
                "rows in the scheduler's prepare_for_extend/prepare_for_decode hooks; mixed chunked "
                "prefill and speculative decoding are not supported with it)"
            )
        return super().write_rows(layer, vids)

    # -- checks -----------------------------------------------------------------------------
    def check(self) -> None:
        """Invariants (tests): page counters match the rows held, free pages hold nothing,
        every entry of ``vids`` lists full pages then at most one partly filled one."""
        rows = self.row_of[:, :, 1:]
        rows = rows[rows >= 0].long()
        live = torch.bincount(rows // self.page_size, minlength=self.num_pages + 1)
        live[0] = 0
        assert torch.equal(live, self.live), "live counts differ from the rows held"
        assert bool((self.used >= self.live).all()) and bool((self.used <= self.page_size).all())
        free = self.pages.ids[: self.pages.top]
        assert bool((self.live[free] == 0).all()) and bool((self.used[free] == 0).all())
        assert len(free) + int((self.live[1:] > 0).sum()) == self.num_pages, "a page is neither free nor held"
        assert torch.unique(rows).numel() == rows.numel(), "a row is held twice"
