"""SGLang adapters over :class:`RowTable`: the KV pool and its token allocator.

``DkvKVPool`` replaces SGLang's ``MHATokenToKVPool`` when a compressing policy is on. It keeps
one K buffer and one V buffer of head-rows shared by all layers (the same bytes SGLang would
give its per-layer buffers) and translates SGLang's token ids through the row table.
``DkvAllocator`` hands SGLang token ids and reports capacity in tokens of all layers, so every
row a policy drops raises ``available_size()`` and the scheduler admits more.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass

import torch
from sglang.srt.mem_cache.allocator.base import BaseTokenToKVPoolAllocator
from sglang.srt.mem_cache.memory_pool import KVCache, unwrap_write_loc

from ..policy import PolicyConfig, Selection
from .kept_index import KeptIndex
from .paged_table import PagedRowTable
from .row_table import RowTable

# Token ids alive at once, per token of capacity: compressed requests keep their ids.
IDS_PER_TOKEN = 8
RECENT_REQUESTS = 256


@dataclass(frozen=True)
class PrefillPlan:
    """One request's prefill: the policy it runs, and the rows it keeps when it is replayed.

    A request retracted after compression is prefilled again over its prompt and the tokens
    it had generated; ``replay`` is the selection made the first time. Its prompt rows are cut
    to that selection again, and its generated tokens attend only to those rows (as they did
    in decode), so the request continues exactly as if it had never been retracted.
    """

    config: PolicyConfig
    replay: Selection | None = None
    prompt_len: int = 0  # the request's own prompt (without generated tokens)

    def chooses(self, seq_len: int) -> bool:
        """Whether the policy runs on this prefill (a replay reuses its selection)."""
        return self.config.compresses and self.prompt_len > self.config.budget and seq_len == self.prompt_len


class DkvKVPool(KVCache):
    """Head-row K/V buffers shared by all layers: ``k_rows`` [R+1, D], ``v_rows`` [R+1, Dv]."""

    def __init__(
        self,
        size: int,
        page_size: int,
        dtype: torch.dtype,
        head_num: int,
        head_dim: int,
        layer_num: int,
        device: str,
        v_head_dim: int | None = None,
        start_layer: int | None = None,
        end_layer: int | None = None,
        row_page_size: int = 1,
        **_unused,
    ):
        if page_size != 1:
            raise ValueError("SGLang's page size must be 1 over the dkv pool (its own page size is row_page_size)")
        super().__init__(size, page_size, dtype, layer_num, device, False, start_layer, end_layer)
        self.head_num = head_num
        self.head_dim = head_dim
        self.v_head_dim = v_head_dim or head_dim
        # Physical pages of head-rows (FlashInfer's page size); SGLang's token ids stay per token.
        self.row_page_size = row_page_size
        if row_page_size > 1:
            self.table = PagedRowTable(layer_num, head_num, size, size * IDS_PER_TOKEN, row_page_size, device)
            self.table.move = self.copy_rows
        else:
            self.table = RowTable(layer_num, head_num, size, size * IDS_PER_TOKEN, device)
        # Each compressed request's kept rows per layer: what decode attends to.
        self.kept = KeptIndex(self.table)
        rows = self.table.num_rows + 1
        self.k_rows = torch.zeros(rows, self.head_dim, dtype=self.store_dtype, device=device)
        self.v_rows = torch.zeros(rows, self.v_head_dim, dtype=self.store_dtype, device=device)
        self.mem_usage = sum(self.get_kv_size_bytes()) / (1 << 30)
        # What each request slot's prefill does, set when its extend batch is formed.
        self._plans: dict[int, PrefillPlan] = {}
        # Window scores recorded by the attention backend during a prefill, per request slot:
        # {req_pool_idx: (seq_len, [per-layer [H, n - w] tensor])}; taken by the compressor.
        self._scores: dict[int, tuple[int, list]] = {}

    # -- SGLang's KVCache interface ------------------------------------------------------------
    def get_kv_size_bytes(self):
        return (
            self.k_rows.numel() * self.k_rows.element_size(),
            self.v_rows.numel() * self.v_rows.element_size(),
        )

    def _unsupported(self, what: str):
        raise NotImplementedError(
            f"{what}: the dkv pool stores rows per (layer, KV head); read it through "
            "DkvKVPool.gather(layer, req_token_ids)"
        )

    def get_key_buffer(self, layer_id: int):
        self._unsupported("get_key_buffer")

    def get_value_buffer(self, layer_id: int):
        self._unsupported("get_value_buffer")

    def get_kv_buffer(self, layer_id: int):
        self._unsupported("get_kv_buffer")

    def set_kv_buffer(self, layer, loc, cache_k, cache_v, *args, **kwargs) -> None:
        vids, _, _ = unwrap_write_loc(loc)
        rows = self.table.write_rows(layer.layer_id - self.start_layer, vids)
        self.k_rows[rows] = cache_k.reshape(-1, self.head_dim).to(self.store_dtype)
        self.v_rows[rows] = cache_v.reshape(-1, self.v_head_dim).to(self.store_dtype)

    def copy_rows(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy K/V head-rows (the paged table packing a compressed request's pages; a request
        copying its kept rows out of the prefix cache)."""
        self.k_rows[dst] = self.k_rows[src]
        self.v_rows[dst] = self.v_rows[src]

    # -- what attention reads --------------------------------------------------------------------
    def gather(self, layer_id: int, vids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a layer for token ids that every head still holds (a prefill's sequence):
        [H, n, D], [H, n, Dv]. A compressed sequence raises: decode reads it through ``kept``."""
        rows = self.table.row_of[layer_id - self.start_layer][:, vids]
        if bool((rows < 0).any()):
            raise RuntimeError("extend over a compressed prefix is not supported by the torch backend")
        rows = rows.to(torch.int64)
        return self.k_rows[rows], self.v_rows[rows]

    # -- prefill plans, from the scheduler to the attention backend and the compressor --------
    def set_plan(self, req_pool_idx: int, plan: PrefillPlan) -> None:
        self._plans[req_pool_idx] = plan
        self.kept.forget(req_pool_idx)  # a new prefill in this slot: whatever was indexed is gone

    def plan_of(self, req_pool_idx: int) -> PrefillPlan | None:
        return self._plans.get(req_pool_idx)

    def end_plan(self, req_pool_idx: int) -> None:
        self._plans.pop(req_pool_idx, None)

    def needs_scores(self, req_pool_idx: int, seq_len: int) -> bool:
        """Whether the backend must record window scores for this prefill."""
        plan = self._plans.get(req_pool_idx)
        return plan is not None and plan.replay is None and plan.chooses(seq_len)

    # -- window scores, from the attention backend to the compressor --------------------------
    def record_scores(self, req_pool_idx: int, seq_len: int, layer_id: int, scores: torch.Tensor) -> None:
        entry = self._scores.get(req_pool_idx)
        if entry is None or entry[0] != seq_len:
            entry = (seq_len, [None] * self.layer_num)
            self._scores[req_pool_idx] = entry
        entry[1][layer_id - self.start_layer] = scores

    def take_scores(self, upto: dict[int, int] | None = None) -> dict[int, tuple[int, list]]:
        """The recorded scores, taken out: all of them, or (``upto``: slot -> sequence length)
        those of these slots recorded at or below that length. With overlap scheduling the
        next batch's prefill may already have recorded its own: those stay for its turn."""
        if upto is None:
            scores, self._scores = self._scores, {}
            return scores
        taken = {s: e for s, e in self._scores.items() if s in upto and e[0] <= upto[s]}
        for slot in taken:
            del self._scores[slot]
        return taken


class DkvAllocator(BaseTokenToKVPoolAllocator):
    """SGLang's token allocator over the dkv pool; capacity counts tokens of all layers."""

    def __init__(self, size: int, dtype: torch.dtype, device: str, kvcache: DkvKVPool, need_sort: bool):
        super().__init__(size, 1, dtype, device, kvcache, need_sort)
        self.table: RowTable = kvcache.table
        self.release_pages = torch.empty((0,), dtype=torch.int64, device=device)
        self.requests_compressed = 0
        self.recent = collections.deque(maxlen=RECENT_REQUESTS)
        # Set when compression frees rows: the scheduler's admission, which stops trying once
        # a request did not fit ("batch is full") until a request leaves, must look again.
        self.freed_since_admission = False

    @property
    def free_pages(self):
        """Free token ids (SGLang's invariant checks read this)."""
        ids = self.table.ids
        return ids.ids[: ids.top]

    @free_pages.setter
    def free_pages(self, value):  # the base __init__ assigns None
        pass

    def clear(self):
        self.table.reset()
        self.get_kvcache().kept.reset()
        self.free_group = None

    def available_size(self):
        return self.table.free_tokens()

    # -- paged rows (row_page_size P > 1): what SGLang's token counts do not see ---------------
    def request_slot_reserve(self, *, has_req_pool_slot: bool, prefill_tokens: int = 0) -> int:
        """Admission charges each request P tokens more: in every (layer, head) its last page
        may be partly filled (:class:`PagedRowTable` counts only whole free pages)."""
        return self.table.page_size if isinstance(self.table, PagedRowTable) else 0

    def check_decode_capacity(self, *, num_tokens: int, tree_cache, requests=None, spec_algorithm=None) -> bool:
        """A decode token may open a page in every (layer, head): P tokens' worth each."""
        if isinstance(self.table, PagedRowTable):
            num_tokens = num_tokens * self.table.page_size
        return super().check_decode_capacity(
            num_tokens=num_tokens, tree_cache=tree_cache, requests=requests, spec_algorithm=spec_algorithm
        )

    def alloc(self, need_size: int):
        return self.table.alloc(need_size)

    def free(self, free_index: torch.Tensor):
        if free_index.numel() == 0:
            return
        if self.free_group is not None:
            self.free_group.append(self._copy_for_free_group(free_index))
            return
        self.table.free(free_index)

    def free_page_ids(self, page_ids: torch.Tensor):
        self.free(page_ids)

    # -- compression -----------------------------------------------------------------------------
    def fork(self, vids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
        """New token ids holding copies of the rows of ``vids`` that ``keep`` [L, H, len(vids)]
        keeps, for a request whose prompt rows SGLang's prefix cache owns (and keeps whole).
        None when the rows are not free."""
        forked = self.table.fork(vids, keep)
        if forked is None:
            return None
        new_vids, src, dst = forked
        self.get_kvcache().copy_rows(src, dst)
        return new_vids

    def compress(
        self, rid: str, vids: torch.Tensor, keep: torch.Tensor, selection: Selection, replayed: bool, released: int = 0
    ) -> int:
        """Drop the head-rows of ``vids`` that ``keep`` [L, H, len(vids)] does not keep; record
        it (``replayed``: a retracted request cut again to its first selection; ``released``:
        head-rows the request handed back to the prefix cache, which may evict them).

        Returns the layer-rows the request no longer holds.
        """
        return self.record(rid, selection, self.table.drop(vids, keep) + released, replayed)

    def record(self, rid: str, selection: Selection, head_rows: int, replayed: bool) -> int:
        """Count a compressed request that gave back ``head_rows``; returns layer-rows freed."""
        freed = head_rows // self.table.num_heads
        self.requests_compressed += 1
        self.freed_since_admission = self.freed_since_admission or freed > 0
        self.recent.append(
            {
                "rid": rid,
                "prompt_tokens": selection.prompt_len,
                "kept_per_layer": selection.kept_per_layer,
                "kv_kept_per_head": selection.kept_per_head,
                "rows_freed": freed,
                "replayed": replayed,
            }
        )
        return freed

    def stats(self) -> dict:
        t = self.table
        return {
            "num_layers": t.num_layers,
            "kv_heads": t.num_heads,
            "page_size": getattr(t, "page_size", 1),
            "pool_rows_total": t.num_tokens * t.num_layers,
            "pool_rows_free": t.free_layer_rows(),
            "token_ids_free": len(t.ids),
            "kept_index_entries": self.get_kvcache().kept.held,
            "requests_compressed": self.requests_compressed,
            "recent": list(self.recent),
        }
