"""FlashInfer over the shared pool: plan once per layer per step, run per layer (no SGLang import).

One batch entry is one (request, KV head): ``num_kv_heads = 1``, ``num_qo_heads = G``; each layer
has its own page table (see ``page_table.py``), so decode holds one wrapper per layer, each with
its own plan. What a plan costs: FlashInfer plans on the host from ``indptr``/``last_page_len``
(O(entries) work plus a small copy of the work split to the device), so a decode step pays
``L`` plans of ``B * H`` entries where SGLang's own backend pays one plan of ``B`` entries
(``bench/gpu_check.py`` measures both). The plan depends only on the lengths, never on the
indices: layers whose lengths agree could share one; that grouping is not done yet.

CUDA graphs: for each captured batch size, ``L`` wrappers with static ``indptr``/``last_page_len``
buffers and one static indices buffer shared by every layer (layer ``l``'s ``indptr`` holds
absolute offsets into it); ``plan_decode`` refills them before each replay. The shared indices
buffer holds at most every head-row of the pool once, plus nothing else: rows are never shared.
"""

from __future__ import annotations

import torch

from . import page_table as pt
from .page_table import PageTables

WORKSPACE_BYTES = 256 * 1024 * 1024  # float workspace (split-KV partials), shared by all wrappers
INT_WORKSPACE_BYTES = 1024 * 1024  # per wrapper: its plan (request/tile indices); FlashInfer's default is 8 MiB


def use_tensor_cores(group: int, dtype: torch.dtype) -> bool:
    """SGLang's rule for FlashInfer decode: tensor cores from a query group of 4 (or fp8 KV)."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        return True
    return dtype in (torch.float16, torch.bfloat16) and group >= 4


class FlashInferKernels:
    """FlashInfer wrappers for one model: a ragged prefill, a paged prefix prefill and per-layer
    paged decode, with static buffers per captured batch size for CUDA graphs."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        group: int,
        head_dim: int,
        dtype,
        device,
        max_rows: int,
        page_size: int = 1,
    ):
        import flashinfer

        self.fi = flashinfer
        self.num_layers, self.num_kv_heads, self.group = num_layers, num_kv_heads, group
        self.head_dim, self.dtype, self.device = head_dim, dtype, device
        self.tensor_cores = use_tensor_cores(group, dtype)
        self.workspace = torch.empty(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self.ragged_wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(self.workspace, "NHD", backend="auto")
        self.prefix_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self.workspace, "NHD", backend="fa2")
        self.decode_wrappers = [self._decode_wrapper() for _ in range(num_layers)]
        self.graph_wrappers: dict[int, list] = {}  # entries -> per-layer wrappers with static buffers
        self.graph_indices = None  # [max_rows] int32, shared by every layer and batch size
        self.max_rows = max_rows
        self.page_size = page_size
        self.active: list = self.decode_wrappers
        self._prefix_tables: PageTables | None = None

    def _decode_wrapper(self, entries: int | None = None):
        kwargs = {}
        if entries is not None:
            kwargs = {
                "use_cuda_graph": True,
                "paged_kv_indptr_buffer": torch.zeros(entries + 1, dtype=torch.int32, device=self.device),
                "paged_kv_indices_buffer": self.graph_indices,
                "paged_kv_last_page_len_buffer": torch.zeros(entries, dtype=torch.int32, device=self.device),
            }
        w = self.fi.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend="fa2", use_tensor_cores=self.tensor_cores, **kwargs
        )
        w.reset_workspace_buffer(
            self.workspace, torch.empty(INT_WORKSPACE_BYTES, dtype=torch.uint8, device=self.device)
        )
        return w

    # -- decode ---------------------------------------------------------------------------------
    def init_graphs(self) -> None:
        if self.graph_indices is None:
            self.graph_indices = torch.zeros(self.max_rows, dtype=torch.int32, device=self.device)

    def graph_decode(self, entries: int) -> None:
        """Use (creating on first call) the static wrappers of a captured batch of ``entries``."""
        if entries not in self.graph_wrappers:
            self.graph_wrappers[entries] = [self._decode_wrapper(entries) for _ in range(self.num_layers)]
        self.active = self.graph_wrappers[entries]

    def eager_decode(self) -> None:
        self.active = self.decode_wrappers

    @property
    def in_graph(self) -> bool:
        """A captured batch's static wrappers are active (decode indices go to ``graph_indices``)."""
        return self.active is not self.decode_wrappers

    def plan_decode(self, tables: PageTables, num_qo_heads: int, head_dim: int, dtype) -> None:
        """Plan every layer's wrapper (host work: L plans); graph wrappers get their buffers refilled."""
        if self.in_graph:
            n = tables.indices.numel()
            if n > self.graph_indices.numel():
                raise RuntimeError(f"{n} indices exceed the static buffer of {self.graph_indices.numel()}")
            if tables.indices.data_ptr() != self.graph_indices.data_ptr():
                self.graph_indices[:n].copy_(tables.indices, non_blocking=True)
            indices = self.graph_indices[:0]  # already in place: the plan copies nothing
        else:
            indices = tables.indices
        for layer, w in enumerate(self.active):
            w.plan(
                tables.indptr_cpu[layer],
                indices,
                tables.last_page_len_cpu[layer],
                self.group,
                1,
                head_dim,
                tables.page_size,
                q_data_type=dtype,
                kv_data_type=dtype,
                non_blocking=True,
            )

    def decode(self, layer: int, q, k_rows, v_rows, scale: float) -> torch.Tensor:
        """q [B*H, G, D] (entry order) -> o [B*H, G, Dv]."""
        kv = self._paged(k_rows, v_rows)
        return self.active[layer].run(q, kv, sm_scale=scale)

    # -- prefill --------------------------------------------------------------------------------
    def plan_extend(self, ragged_qo, prefix: PageTables | None, prefix_qo, num_qo_heads, head_dim, dtype) -> None:
        self.ragged_wrapper.plan(
            ragged_qo,
            ragged_qo,
            num_qo_heads,
            self.num_kv_heads,
            head_dim,
            causal=True,
            q_data_type=dtype,
            kv_data_type=dtype,
        )
        self._prefix_tables, self._prefix_qo = prefix, prefix_qo

    def ragged(self, q, k, v, scale: float):
        return self.ragged_wrapper.run(q, k, v, sm_scale=scale, return_lse=True)

    def prefix(self, layer: int, q, k_rows, v_rows, scale: float):
        """The cached prefix of each (request, KV head): one plan per layer, just before its run."""
        t = self._prefix_tables
        self.prefix_wrapper.plan(
            self._prefix_qo,
            t.indptr_cpu[layer],
            t.indices,
            t.last_page_len_cpu[layer],
            self.group,
            1,
            self.head_dim,
            t.page_size,
            causal=False,
            q_data_type=q.dtype,
            kv_data_type=k_rows.dtype,
            non_blocking=True,
        )
        return self.prefix_wrapper.run(q, self._paged(k_rows, v_rows), sm_scale=scale, return_lse=True)

    def merge(self, o1, s1, o2, s2) -> torch.Tensor:
        return self.fi.merge_state(o1, s1, o2, s2)[0]

    # -- layout ---------------------------------------------------------------------------------
    def _paged(self, k_rows, v_rows):
        """The pool [R + 1, D] as FlashInfer's NHD pages [pages, page_size, 1, D]."""
        p = self.page_size
        return k_rows.view(-1, p, 1, k_rows.shape[-1]), v_rows.view(-1, p, 1, v_rows.shape[-1])


def attend_extend(kernels, layer: int, q, k, v, k_rows, v_rows, scale: float, order, num_kv_heads: int):
    """Prefill attention: ragged (causal, new tokens) merged with the paged cached prefix.

    q [T, Hq, D], k/v [T, H, D] token-major; ``order`` is the batch's query entry order, None when
    no request has a prefix. Works with any kernel set (FlashInfer, or the torch reference).
    """
    o, lse = kernels.ragged(q, k, v, scale)
    if order is None:
        return o
    o2, s2 = kernels.prefix(layer, pt.to_entries(q, order, num_kv_heads), k_rows, v_rows, scale)
    return kernels.merge(o, lse, pt.from_entries(o2, order, num_kv_heads), pt.from_entries(s2, order, num_kv_heads))
