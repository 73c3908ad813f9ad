"""Plain torch paged attention over the same page tables FlashInfer gets (the CPU reference).

``TorchPagedKernels`` has the interface of ``flashinfer_kernels.FlashInferKernels`` (plan once
per step, run per layer), so the FlashInfer backend runs on CPU with it, and a test compares
that with the torch backend: every index the GPU would read is checked without a GPU.
Log-sum-exp here is natural-log (FlashInfer's is base 2); each kernel set merges its own states.
"""

from __future__ import annotations

import itertools

import torch

from .page_table import PageTables


def paged_attention(
    q: torch.Tensor,
    k_rows: torch.Tensor,
    v_rows: torch.Tensor,
    qo_indptr: list[int],
    indptr: list[int],
    indices: torch.Tensor,
    last_page_len: list[int],
    page_size: int,
    scale: float,
    causal: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of entry-ordered queries over pages, one KV head per entry.

    Args:
        q:          [Nq, G, D], entry e owns rows qo_indptr[e]:qo_indptr[e+1].
        k_rows, v_rows: [R + 1, D], [R + 1, Dv]: the pool; page p is rows p*P .. p*P+P-1.
        indptr, indices, last_page_len: FlashInfer's CSR page table (absolute indptr).
        causal:     query j of n sees keys < kv_len - n + j + 1 (FlashInfer's bottom-right mask).

    Returns:
        o [Nq, G, Dv] (zeros for an empty entry) and lse [Nq, G] float32 (-inf when empty).
    """
    o = q.new_zeros(q.shape[0], q.shape[1], v_rows.shape[1])
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    offs = torch.arange(page_size, device=k_rows.device)
    for e in range(len(indptr) - 1):
        q0, q1 = qo_indptr[e], qo_indptr[e + 1]
        pages = indices[indptr[e] : indptr[e + 1]].long()
        if q1 == q0 or len(pages) == 0:
            continue
        kv_len = (len(pages) - 1) * page_size + last_page_len[e]
        rows = (pages[:, None] * page_size + offs[None, :]).reshape(-1)[:kv_len]
        k, v = k_rows[rows].float(), v_rows[rows].float()
        logits = torch.einsum("ngd,kd->gnk", q[q0:q1].float(), k) * scale  # [G, n, kv]
        if causal:
            n = q1 - q0
            allowed = torch.arange(kv_len)[None, :] <= torch.arange(kv_len - n, kv_len)[:, None]
            logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
        lse[q0:q1] = torch.logsumexp(logits, dim=-1).transpose(0, 1)
        o[q0:q1] = torch.einsum("gnk,kd->ngd", torch.softmax(logits, dim=-1), v).to(o.dtype)
    return o, lse


def ragged_attention(q, k, v, qo_indptr: list[int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of each request's new tokens over themselves: q [T, Hq, D], k/v [T, H, D]."""
    o = q.new_zeros(q.shape[0], q.shape[1], v.shape[2])
    lse = torch.empty(q.shape[:2], dtype=torch.float32, device=q.device)
    g = q.shape[1] // k.shape[1]
    for s, t in itertools.pairwise(qo_indptr):
        if t == s:
            continue
        kk = k[s:t].float().repeat_interleave(g, dim=1)
        logits = torch.einsum("nhd,khd->hnk", q[s:t].float(), kk) * scale
        mask = torch.ones(t - s, t - s, dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~mask, float("-inf"))
        lse[s:t] = torch.logsumexp(logits, dim=-1).transpose(0, 1)
        vv = v[s:t].float().repeat_interleave(g, dim=1)
        o[s:t] = torch.einsum("hnk,khd->nhd", torch.softmax(logits, dim=-1), vv).to(o.dtype)
    return o, lse


def merge_states(o1, s1, o2, s2) -> torch.Tensor:
    """Combine two partial attentions over disjoint keys (natural-log lse [N, H])."""
    s = torch.logaddexp(s1, s2)
    w1 = torch.exp(s1 - s).nan_to_num(0.0)[..., None]
    w2 = torch.exp(s2 - s).nan_to_num(0.0)[..., None]
    return (o1.float() * w1 + o2.float() * w2).to(o1.dtype)


class TorchPagedKernels:
    """The kernel set of the FlashInfer backend, in plain torch (slow; for tests and checks)."""

    in_graph = False
    graph_indices = None

    def __init__(self):
        self._decode: PageTables | None = None
        self._prefix: PageTables | None = None
        self._prefix_qo: list[int] = []
        self._ragged_qo: list[int] = []

    def init_graphs(self) -> None:  # graphs are a GPU matter: nothing to hold here
        pass

    def graph_decode(self, entries: int) -> None:
        pass

    def eager_decode(self) -> None:
        pass

    def plan_decode(self, tables: PageTables, num_qo_heads: int, head_dim: int, dtype) -> None:
        self._decode = tables

    def decode(self, layer: int, q, k_rows, v_rows, scale: float) -> torch.Tensor:
        qo = list(range(q.shape[0] + 1))
        return self._paged(self._decode, layer, q, k_rows, v_rows, qo, scale)[0]

    @staticmethod
    def _paged(t: PageTables, layer: int, q, k_rows, v_rows, qo, scale: float):
        """Attention of ``q`` (entries split by ``qo``) over layer ``layer``'s pages of ``t``."""
        indptr, last = t.indptr_cpu[layer].tolist(), t.last_page_len_cpu[layer].tolist()
        return paged_attention(q, k_rows, v_rows, qo, indptr, t.indices, last, t.page_size, scale, causal=False)

    def plan_extend(self, ragged_qo, prefix: PageTables | None, prefix_qo, num_qo_heads, head_dim, dtype) -> None:
        self._ragged_qo = ragged_qo.tolist()
        self._prefix = prefix
        self._prefix_qo = prefix_qo.tolist() if prefix_qo is not None else []

    def ragged(self, q, k, v, scale: float):
        return ragged_attention(q, k, v, self._ragged_qo, scale)

    def prefix(self, layer: int, q, k_rows, v_rows, scale: float):
        return self._paged(self._prefix, layer, q, k_rows, v_rows, self._prefix_qo, scale)

    @staticmethod
    def merge(o1, s1, o2, s2) -> torch.Tensor:
        return merge_states(o1, s1, o2, s2)
