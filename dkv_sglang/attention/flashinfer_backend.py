"""The GPU attention backend over the dkv pool: FlashInfer, one page table per layer.

Prefill runs FlashInfer's ragged kernel over each request's new tokens (all heads, causal) and,
when a request has a cached prefix, a paged pass over the rows each (layer, KV head) holds of
it; the two are merged by log-sum-exp as SGLang's own backend does. The window scores the
policy needs come from a small matmul of the last ``window`` queries against the request's keys
(``policy.window_scores``: [H, w, n], never [n, n]). Decode reads each layer's own page table
(``page_table.py``) with one FlashInfer plan per layer; CUDA graphs capture it over static
per-layer buffers (``flashinfer_kernels.py``). A retracted request's replayed prefill, which
needs a mask FlashInfer has no form for, runs through the torch backend.

``kernels`` may be ``paged_reference.TorchPagedKernels``: the same backend then runs on CPU,
which is how the tests check every index this backend hands FlashInfer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from sglang.srt.layers.attention.base_attn_backend import AttentionBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc

from ..memory.kept_index import watch_slots
from ..memory.pool import DkvKVPool
from ..policy import PolicyConfig, window_scores
from . import page_table as pt
from .flashinfer_kernels import attend_extend

_DEFAULT_BACKEND = "sglang.srt.arg_groups.overrides._attention_backend_default"


@dataclass
class ExtendMetadata:
    """One prefill batch. Host lists; ``order`` (device) puts queries in prefix-entry order."""

    ext_lens: list[int]
    seq_lens: list[int]
    req_pool_indices: list[int]
    has_prefix: bool
    order: torch.Tensor | None
    replay: bool  # some request replays a selection: the torch backend runs the batch


def _as_list(x) -> list[int]:
    return x.tolist() if isinstance(x, torch.Tensor) else list(x)


class DkvFlashInferAttnBackend(AttentionBackend):
    def __init__(self, model_runner, config: PolicyConfig, kernels=None, num_q_heads: int | None = None):
        super().__init__()
        pool = model_runner.token_to_kv_pool
        if not isinstance(pool, DkvKVPool):
            raise TypeError("DkvFlashInferAttnBackend needs the dkv pool (is the plugin loaded?)")
        self.pool: DkvKVPool = pool
        self.config = config
        self.model_runner = model_runner
        self.req_to_token = model_runner.req_to_token_pool.req_to_token
        watch_slots(model_runner.req_to_token_pool, pool.kept)
        self.num_kv_heads = pool.head_num
        self.num_q_heads = num_q_heads or _q_heads(model_runner)
        self.group = self.num_q_heads // self.num_kv_heads
        if kernels is None:
            from .flashinfer_kernels import FlashInferKernels

            kernels = FlashInferKernels(
                pool.layer_num,
                self.num_kv_heads,
                self.group,
                pool.head_dim,
                pool.dtype,
                model_runner.device,
                max_rows=pool.table.num_rows + 1,
                page_size=pool.row_page_size,
            )
        self.kernels = kernels
        self.extend: ExtendMetadata | None = None
        self._torch = None

    # -- metadata: once per step ------------------------------------------------------------------
    def init_forward_metadata(self, forward_batch):
        if forward_batch.forward_mode.is_decode_or_idle():
            self.kernels.eager_decode()
            self._plan_decode(forward_batch, forward_batch.batch_size)
        else:
            self._plan_extend(forward_batch)

    def _plan_decode(self, forward_batch, bs: int) -> None:
        """Every layer's page tables with a fixed number of ops (indices straight into the CUDA
        graph's static buffer when one is replayed), lengths from the host."""
        fb, pool = forward_batch, self.pool
        slots = pt.host_ints(getattr(fb, "req_pool_indices_cpu", None), fb.req_pool_indices)[:bs]
        seq_lens = pt.host_ints(fb.seq_lens_cpu, fb.seq_lens)[:bs]
        step = pt.decode_rows(pool.kept, pool.table.row_of, self.req_to_token, slots, seq_lens)
        out = self.kernels.graph_indices if self.kernels.in_graph else None
        tables = pt.decode_tables(step, pool.row_page_size, out=out)
        self.kernels.plan_decode(tables, self.group, self.pool.head_dim, self.pool.dtype)

    def _plan_extend(self, fb) -> None:
        rpis = pt.host_ints(getattr(fb, "req_pool_indices_cpu", None), fb.req_pool_indices).tolist()
        seq_lens = pt.host_ints(fb.seq_lens_cpu, fb.seq_lens).tolist()
        ext_lens = _as_list(fb.extend_seq_lens_cpu if fb.extend_seq_lens_cpu is not None else fb.extend_seq_lens)
        prefix_lens = [s - e for s, e in zip(seq_lens, ext_lens)]
        replay = any((p := self.pool.plan_of(r)) is not None and p.replay is not None for r in rpis)
        has_prefix = any(prefix_lens) and not replay
        self.extend = ExtendMetadata(ext_lens, seq_lens, rpis, has_prefix, None, replay)
        if replay:
            return
        ragged_qo = torch.zeros(len(ext_lens) + 1, dtype=torch.int32)
        ragged_qo[1:] = torch.cumsum(torch.tensor(ext_lens), 0)
        tables = prefix_qo = None
        if has_prefix:
            vids = pt.batch_vids(self.req_to_token, fb.req_pool_indices, prefix_lens)
            tables = pt.build_tables(self.pool.table.row_of, vids, prefix_lens, self.pool.row_page_size)
            prefix_qo = pt.qo_indptr(ext_lens, self.num_kv_heads)
            self.extend.order = pt.query_order(ext_lens, self.num_kv_heads, self.pool.k_rows.device)
        self.kernels.plan_extend(ragged_qo, tables, prefix_qo, self.num_q_heads, self.pool.head_dim, self.pool.dtype)

    # -- forward: per layer -------------------------------------------------------------------------
    def _store(self, k, v, layer, forward_batch, save_kv_cache) -> None:
        if layer.is_cross_attention or (layer.sliding_window_size is not None and layer.sliding_window_size > -1):
            raise NotImplementedError("dkv-sglang supports full causal self-attention layers only")
        if save_kv_cache and k is not None and v is not None:
            self.pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc), k, v)

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        self._store(k, v, layer, forward_batch, save_kv_cache)
        bs = q.shape[0]
        q_ = q.reshape(bs * self.num_kv_heads, self.group, layer.qk_head_dim)
        o = self.kernels.decode(
            layer.layer_id - self.pool.start_layer, q_, self.pool.k_rows, self.pool.v_rows, layer.scaling
        )
        return o.reshape(bs, layer.tp_q_head_num * layer.v_head_dim)

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        meta = self.extend
        if meta.replay:
            return self._torch_backend().forward_extend(q, k, v, layer, forward_batch, save_kv_cache)
        self._store(k, v, layer, forward_batch, save_kv_cache)
        h, d = self.num_kv_heads, layer.qk_head_dim
        q_ = q.reshape(-1, layer.tp_q_head_num, d)
        k_ = k.reshape(-1, h, d).to(q_.dtype)
        v_ = v.reshape(-1, h, layer.v_head_dim).to(q_.dtype)
        li = layer.layer_id - self.pool.start_layer
        order = meta.order if meta.has_prefix else None
        pool = self.pool
        o = attend_extend(self.kernels, li, q_, k_, v_, pool.k_rows, pool.v_rows, layer.scaling, order, h)
        self._record_scores(q_, layer)
        return o.reshape(-1, layer.tp_q_head_num * layer.v_head_dim)

    def _record_scores(self, q_, layer) -> None:
        """Window scores of each request the policy will cut: [H, w, n] softmax, never [n, n]."""
        meta, end = self.extend, 0
        for rpi, seq_len, ext_len in zip(meta.req_pool_indices, meta.seq_lens, meta.ext_lens):
            end += ext_len
            if not self.pool.needs_scores(rpi, seq_len):
                continue
            keys, _ = self.pool.gather(layer.layer_id, self.req_to_token[rpi, :seq_len])
            w = min(self.config.window, ext_len)
            scores = window_scores(q_[end - w : end], keys, layer.scaling)[:, : seq_len - self.config.window]
            self.pool.record_scores(rpi, seq_len, layer.layer_id, scores)

    def _torch_backend(self):
        if self._torch is None:
            from .torch_backend import DkvTorchAttnBackend

            self._torch = DkvTorchAttnBackend(self.model_runner, self.config)
        return self._torch

    # -- CUDA graphs (decode) -----------------------------------------------------------------------
    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, kv_indices_buf=None):
        self.kernels.init_graphs()

    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        if not forward_batch.forward_mode.is_decode_or_idle():
            raise NotImplementedError("dkv-sglang captures decode only in CUDA graphs")
        bs = forward_batch.batch_size
        self.kernels.graph_decode(bs * self.num_kv_heads)
        self._plan_decode(forward_batch, bs)

    def get_cuda_graph_seq_len_fill_value(self):
        return 1


def _q_heads(model_runner) -> int:
    from sglang.srt.layers.dp_attention import get_attention_tp_size

    return model_runner.model_config.num_attention_heads // get_attention_tp_size()


# -- registration -----------------------------------------------------------------------------------
def register_gpu_backend(config: PolicyConfig) -> None:
    """With a compressing policy: SGLang's ``flashinfer`` name builds this backend, and it is the
    default on CUDA when no ``--attention-backend`` (or prefill/decode backend) is given."""
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    ATTENTION_BACKENDS["flashinfer"] = lambda runner: DkvFlashInferAttnBackend(runner, config)
    HookRegistry.register(_DEFAULT_BACKEND, default_to_flashinfer, HookType.AROUND)


def default_to_flashinfer(original, view) -> dict:
    """SGLang's default-backend pass, choosing ``flashinfer`` on CUDA when the user chose none."""
    chosen = (view.attention_backend, view.prefill_attention_backend, view.decode_attention_backend)
    if all(c is None for c in chosen) and torch.cuda.is_available():
        return {"attention_backend": "flashinfer"}
    return original(view)
