"""The page tables FlashInfer reads over the shared pool, built from the row table (pure torch).

Each (request, KV head) of a layer keeps its own tokens, so one FlashInfer batch entry is one
(request, KV head) pair: ``num_kv_heads = 1`` and ``num_qo_heads = G`` (the query group), with the
pool's head-rows viewed as pages ``[R + 1, page_size, 1, D]``. Entry ``e = i * H + h`` is head
``h`` of request ``i``; its keys are, in position order, the rows that layer still holds for the
request's token ids. A decode batch's queries ``q [B, H * G, D]`` are already in entry order
(``q.view(B * H, G, D)``); a prefill's are reordered with :func:`entry_order`.

All layers' indices of one step live in one tensor: layer ``l``'s ``indptr[l]`` holds absolute
offsets into it (FlashInfer's kernels read ``indices[indptr[e] + page]``), so a CUDA graph can
capture every layer over one static indices buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..memory.kept_index import KeptIndex


@dataclass(frozen=True)
class PageTables:
    """One step's page tables for every layer, in FlashInfer's CSR form.

    indices:       [nnz] int32, device: page ids (head-rows when page_size == 1), all layers.
    indptr:        [L, E + 1] int32, device: layer l, entry e reads indices[indptr[l, e]:indptr[l, e + 1]].
    last_page_len: [L, E] int32, device: rows used in each entry's last page (0: empty entry).
    indptr_cpu, last_page_len_cpu: the same on the host (FlashInfer plans on the host).
    kv_lens_cpu:   [L, E] int64, host: keys each entry attends to.
    """

    indices: torch.Tensor
    indptr: torch.Tensor
    last_page_len: torch.Tensor
    indptr_cpu: torch.Tensor
    last_page_len_cpu: torch.Tensor
    kv_lens_cpu: torch.Tensor
    page_size: int

    @property
    def num_layers(self) -> int:
        return self.indptr.shape[0]

    @property
    def num_entries(self) -> int:
        return self.indptr.shape[1] - 1

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indptr [E+1], indices (all layers), last_page_len [E]) of one layer, on the device."""
        return self.indptr[layer], self.indices, self.last_page_len[layer]


@dataclass
class DecodeGroup:
    """Requests of a decode batch read the same way, padded to one width.

    members:      [Bg] int64 host: their places in the batch (``members_dev`` on the device).
    rows:         [L, Bg, H, W] device: each (layer, request, head)'s rows first, in position
                  order, then padding (any row id; never attended to).
    lens:         [L, Bg, H] int64 host: rows each head attends to.
    lens_dev:     the same on the device.
    compressed:   rows come from the kept-row index (else from req_to_token and the row table).
    """

    members: np.ndarray
    members_dev: torch.Tensor
    rows: torch.Tensor
    lens: np.ndarray
    lens_dev: torch.Tensor
    compressed: bool

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([Bg, H, W] rows as stored (int32 from the index; padding and rows the table no longer
        holds read as row 0), [Bg, H, W] bool: attended) of one layer."""
        rows = self.rows[layer]
        width = torch.arange(rows.shape[2], device=rows.device)
        valid = width[None, None, :] < self.lens_dev[layer, :, :, None]
        if not self.compressed:  # a row the table no longer holds (-1) is never read
            valid = valid & (rows >= 0)
        return rows.clamp_min(0), valid


@dataclass
class DecodeRows:
    """What one decode step reads, for every layer: the batch split into at most two groups
    (compressed requests from :class:`KeptIndex`, the others from ``req_to_token``), each read
    with a fixed number of ops whatever the batch size. Both backends read it: the torch
    backend attends to each group's padded rows, FlashInfer pages them (:func:`decode_tables`)."""

    batch_size: int
    groups: list[DecodeGroup]


def decode_rows(index: KeptIndex, row_of: torch.Tensor, req_to_token: torch.Tensor, slots: np.ndarray,
                seq_lens: np.ndarray) -> DecodeRows:
    """The rows a decode batch attends to. ``slots`` and ``seq_lens`` are SGLang's host-side
    ``req_pool_indices_cpu`` and ``seq_lens_cpu`` (the new token included): nothing is read
    back from the device."""
    slots = np.asarray(slots, dtype=np.int64)
    seq_lens = np.asarray(seq_lens, dtype=np.int64)
    device = row_of.device
    num_layers, num_heads = row_of.shape[0], row_of.shape[1]
    live = index.live(slots, seq_lens)
    groups = []
    members = np.flatnonzero(live)
    if len(members):
        s, n = slots[members], seq_lens[members]
        width = index.width(s, n)
        # [L, Bc, H, W]; advanced indexing reads only the rows taken (index_select of the
        # strided slice would first copy every entry's rows)
        rows = index.rows[:, _to(index.entries(s), device), :, :width]
        lens = index.lens(s, n).transpose(1, 0, 2).copy()
        groups.append(DecodeGroup(members, _to(members, device), rows, lens, _to(lens, device), True))
    members = np.flatnonzero(~live)
    if len(members):
        s, n = slots[members], seq_lens[members]
        width = int(n.max())
        vids = req_to_token.index_select(0, _to(s, req_to_token.device))[:, :width].to(device, torch.int64)  # [Bu, W]
        rows = row_of[:, :, vids].transpose(1, 2)  # [L, Bu, H, W]
        lens = np.broadcast_to(n[None, :, None], (num_layers, len(n), num_heads)).copy()
        groups.append(DecodeGroup(members, _to(members, device), rows, lens, _to(lens, device), False))
    return DecodeRows(len(slots), groups)


def _to(a: np.ndarray, device) -> torch.Tensor:
    """A host array on the device: an upload, never a wait for the device."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t if torch.device(device).type == "cpu" else t.to(device, non_blocking=True)


def host_ints(host, device_tensor) -> np.ndarray:
    """SGLang's host copy of a batch field (``seq_lens_cpu``, ``req_pool_indices_cpu``) as
    numpy; only a caller without one (a test's hand-built batch) reads the device tensor."""
    t = host if host is not None else device_tensor.cpu()
    return t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def decode_tables(step: DecodeRows, page_size: int = 1, out: torch.Tensor | None = None) -> PageTables:
    """Page tables of every layer for a decode step, with a fixed number of ops per group
    (never per request or layer): ``indptr`` and ``last_page_len`` come from host lengths
    (cumsums in numpy), ``indices`` from one gather per group into ``out`` (the CUDA graph's
    static buffer) when given. Each group's rows must fill pages in order when
    ``page_size > 1`` (the paged row table lays them out so); page ids are the page-start rows
    divided by the page size."""
    num_layers = step.groups[0].rows.shape[0] if step.groups else 0
    num_heads = step.groups[0].rows.shape[2] if step.groups else 0
    b, device = step.batch_size, step.groups[0].rows.device if step.groups else torch.device("cpu")
    kv_lens = np.zeros((num_layers, b, num_heads), dtype=np.int64)
    for g in step.groups:
        kv_lens[:, g.members] = g.lens
    pages = (kv_lens + page_size - 1) // page_size  # [L, B, H]
    flat = pages.reshape(-1)
    ptr = np.zeros(flat.size + 1, dtype=np.int64)
    np.cumsum(flat, out=ptr[1:])
    nnz = int(ptr[-1])
    entries = b * num_heads
    indptr = ptr[np.arange(num_layers)[:, None] * entries + np.arange(entries + 1)[None, :]]
    last = np.where(kv_lens > 0, kv_lens - (pages - 1) * page_size, 0).reshape(num_layers, entries)
    if out is None:
        out = torch.empty(nnz, dtype=torch.int32, device=device)
    elif out.numel() < nnz:
        raise RuntimeError(f"{nnz} indices exceed the static buffer of {out.numel()}")
    for g in step.groups:
        _gather_pages(g, pages, ptr, entries, page_size, out, whole=len(step.groups) == 1)
    indptr32 = torch.from_numpy(indptr.astype(np.int32))
    last32 = torch.from_numpy(last.astype(np.int32))
    if torch.device(device).type == "cuda":  # pinned: FlashInfer's plan copies them without a sync
        indptr32, last32 = indptr32.pin_memory(), last32.pin_memory()
    return PageTables(
        indices=out[:nnz],
        indptr=indptr32.to(device, non_blocking=True),
        last_page_len=last32.to(device, non_blocking=True),
        indptr_cpu=indptr32,
        last_page_len_cpu=last32,
        kv_lens_cpu=torch.from_numpy(kv_lens.reshape(num_layers, entries)),
        page_size=page_size,
    )


def _gather_pages(g: DecodeGroup, pages: np.ndarray, ptr: np.ndarray, entries: int, page_size: int,
                  out: torch.Tensor, whole: bool) -> None:
    """Write one group's page ids into ``out`` at its entries' offsets: one gather at indices
    expanded from per-entry runs (:func:`_runs`), straight into ``out`` when the group is the
    whole batch (its pages are then ``out``'s first ``total``, in order), else one put."""
    num_layers, num_heads = g.rows.shape[0], g.rows.shape[2]
    src = g.rows[..., ::page_size] if page_size > 1 else g.rows  # page-start rows [L, Bg, H, Wp]
    wp = src.shape[3]
    src = src.reshape(-1)  # entries in the tables' order: layer, request, head
    n_pages = pages[:, g.members].reshape(-1)  # [L, Bg, H] flattened
    total = int(n_pages.sum())
    if total == 0:
        return
    at = _runs(np.arange(n_pages.size, dtype=np.int64) * wp, n_pages, total, src.device)
    if whole and page_size == 1 and src.dtype == out.dtype:
        torch.index_select(src, 0, at, out=out[:total])
        return
    values = src.index_select(0, at)
    if page_size > 1:
        values = torch.div(values, page_size, rounding_mode="floor")
    if whole:
        out[:total] = values
        return
    layer = np.arange(num_layers)[:, None, None]
    head = np.arange(num_heads)[None, None, :]
    start = ptr[(layer * entries + g.members[None, :, None] * num_heads + head).reshape(-1)]
    out.index_put_((_runs(start, n_pages, total, src.device).long(),), values.to(out.dtype))


def _runs(starts: np.ndarray, lens: np.ndarray, total: int, device) -> torch.Tensor:
    """[total] ``starts[e], starts[e] + 1, ...`` (``lens[e]`` values) for every entry e, on the
    device: ones with each run's jump put at its first place, then one cumsum (the jumps are
    computed on the host; int32 when the values fit)."""
    keep = lens > 0
    starts, lens = starts[keep], lens[keep]
    first = np.cumsum(lens) - lens
    ends = starts + lens - 1  # each run's last value
    jumps = starts - np.concatenate([[1], ends[:-1] + 1]) + 1
    jumps[0] = starts[0]
    wide = int(max(ends.max(), total)) >= 2**31
    dtype = torch.int64 if wide else torch.int32
    d = torch.ones(total, dtype=dtype, device=device)
    d.index_put_((_to(first, device),), _to(jumps.astype(np.int64 if wide else np.int32), device))
    return torch.cumsum(d, 0, dtype=dtype)


def batch_vids(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, lens: list[int]) -> torch.Tensor:
    """[sum(lens)] int64: request i's first ``lens[i]`` token ids, request-major."""
    if not lens or max(lens) == 0:
        return torch.zeros(0, dtype=torch.int64, device=req_to_token.device)
    span = req_to_token[req_pool_indices.to(req_to_token.device).long(), : max(lens)]
    mask = torch.arange(max(lens), device=span.device)[None, :] < torch.tensor(lens, device=span.device)[:, None]
    return span[mask].long()


def entry_order(lens: list[int], num_heads: int, device) -> torch.Tensor:
    """[H * sum(lens)] int64: for entries (i, h) in order, then their positions t, the index
    ``h * N + start_i + t`` into a head-major [H, N] layout (N = sum(lens))."""
    n = sum(lens)
    lens_t = torch.tensor(lens, dtype=torch.int64, device=device)
    starts = torch.cumsum(lens_t, 0) - lens_t
    heads = torch.arange(num_heads, dtype=torch.int64, device=device)
    entry_start = (heads[None, :] * n + starts[:, None]).reshape(-1)  # [B * H]
    entry_len = lens_t.repeat_interleave(num_heads)
    total = n * num_heads
    first = torch.cumsum(entry_len, 0) - entry_len
    offset = torch.arange(total, dtype=torch.int64, device=device) - torch.repeat_interleave(
        first, entry_len, output_size=total
    )
    return torch.repeat_interleave(entry_start, entry_len, output_size=total) + offset


def build_tables(row_of: torch.Tensor, vids: torch.Tensor, lens: list[int], page_size: int = 1) -> PageTables:
    """Page tables of every layer for a batch.

    Args:
        row_of:    [L, H, V + 1] int32, the row table (-1: dropped in that layer and head).
        vids:      [N] token ids of the batch, request-major (:func:`batch_vids`).
        lens:      tokens per request (sum N).
        page_size: rows per page; with page_size > 1 each entry's rows must fill pages in order
                   (row = page * page_size + position % page_size), else ValueError.
    """
    num_layers, num_heads, _ = row_of.shape
    device = row_of.device
    order = entry_order(lens, num_heads, device)
    entry_len = torch.tensor(lens, dtype=torch.int64).repeat_interleave(num_heads)
    entry_of = torch.repeat_interleave(
        torch.arange(len(entry_len), device=device), entry_len.to(device), output_size=len(order)
    )
    vids = vids.to(device)
    per_layer, counts = [], []
    for layer in range(num_layers):
        rows = row_of[layer][:, vids].reshape(-1)[order]
        held = rows >= 0
        kept = torch.zeros(len(entry_len), dtype=torch.int64, device=device)
        kept.index_add_(0, entry_of, held.long())
        per_layer.append(rows[held])
        counts.append(kept)
    kv_lens = torch.stack(counts).cpu() if counts else torch.zeros(0, len(entry_len), dtype=torch.int64)
    return _paginate(per_layer, kv_lens, page_size, device)


def _paginate(per_layer: list[torch.Tensor], kv_lens: torch.Tensor, page_size: int, device) -> PageTables:
    """CSR tables from each layer's rows in entry order and the rows per entry."""
    pages_per_entry = (kv_lens + page_size - 1) // page_size  # [L, E]
    sizes = pages_per_entry.sum(dim=1)  # pages per layer
    bases = torch.cumsum(sizes, 0) - sizes
    indptr = torch.zeros(kv_lens.shape[0], kv_lens.shape[1] + 1, dtype=torch.int64)
    indptr[:, 1:] = torch.cumsum(pages_per_entry, 1)
    indptr += bases[:, None]
    last = torch.where(kv_lens > 0, kv_lens - (pages_per_entry - 1) * page_size, torch.zeros_like(kv_lens))
    indices = [_pages(rows, kv_lens[layer], page_size) for layer, rows in enumerate(per_layer)]
    indices = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.int64, device=device)
    indptr32, last32 = indptr.to(torch.int32), last.to(torch.int32)
    if torch.device(device).type == "cuda":  # pinned: FlashInfer's plan copies them without a sync
        indptr32, last32 = indptr32.pin_memory(), last32.pin_memory()
    return PageTables(
        indices=indices.to(torch.int32),
        indptr=indptr32.to(device, non_blocking=True),
        last_page_len=last32.to(device, non_blocking=True),
        indptr_cpu=indptr32,
        last_page_len_cpu=last32,
        kv_lens_cpu=kv_lens,
        page_size=page_size,
    )


def _pages(rows: torch.Tensor, kv_lens: torch.Tensor, page_size: int) -> torch.Tensor:
    """Page ids of one layer's rows (entry order); checks that each entry fills its pages in order."""
    rows = rows.long()
    if page_size == 1:
        return rows
    first = torch.cumsum(kv_lens, 0) - kv_lens
    pos = torch.arange(len(rows)) - torch.repeat_interleave(first, kv_lens, output_size=len(rows))
    pos = pos.to(rows.device)
    starts = pos % page_size == 0
    page = rows // page_size
    # every row must be its page's row at its position, and share the page of its page's first row
    page_start = torch.cumsum(starts.long(), 0) - 1
    if not bool((rows % page_size == pos % page_size).all()) or not bool((page == page[starts][page_start]).all()):
        raise ValueError(f"rows are not laid out in pages of {page_size}")
    return page[starts]


def query_order(ext_lens: list[int], num_heads: int, device) -> torch.Tensor:
    """Gather index putting prefill queries in entry order: ``q_entries = heads_major(q)[order]``
    where heads_major(q) is q [T, H * G, D] viewed as [H * T, G, D] (see :func:`to_entries`)."""
    return entry_order(ext_lens, num_heads, device)


def to_entries(x: torch.Tensor, order: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[T, H * G, ...] token-major -> [H * T, G, ...] rows in entry order."""
    t = x.shape[0]
    x = x.view(t, num_heads, -1, *x.shape[2:]).transpose(0, 1)
    return x.reshape(num_heads * t, *x.shape[2:])[order]


def from_entries(y: torch.Tensor, order: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of :func:`to_entries`: [H * T, G, ...] entry order -> [T, H * G, ...]."""
    out = torch.empty_like(y)
    out[order] = y
    t = y.shape[0] // num_heads
    out = out.view(num_heads, t, *y.shape[1:]).transpose(0, 1)
    return out.reshape(t, -1, *y.shape[2:])


def qo_indptr(ext_lens: list[int], num_heads: int) -> torch.Tensor:
    """[B * H + 1] int32 (host): entry (i, h) owns ext_lens[i] queries."""
    lens = torch.tensor(ext_lens, dtype=torch.int64).repeat_interleave(num_heads)
    out = torch.zeros(len(lens) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(lens, 0)
    return out
