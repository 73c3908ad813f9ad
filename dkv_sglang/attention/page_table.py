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

import torch

from ..memory.row_table import HeadRows


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


def tables_from_rows(rows: list[list[HeadRows]], page_size: int = 1) -> PageTables:
    """Page tables of every layer from each request's head-rows per layer (what
    ``DkvKVPool.decode_rows`` gives, the torch backend's decode reads the same); one entry per
    (request, KV head), each as long as that head's rows."""
    device = rows[0][0].rows.device
    per_layer = [torch.cat([r.rows[r.mask()] for r in layer]) for layer in rows]
    kv_lens = torch.stack([torch.cat([r.lens.cpu() for r in layer]) for layer in rows]).to(torch.int64)
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
