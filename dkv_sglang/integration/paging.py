"""Physical pages of head-rows (``--page-size P > 1`` with a compressing policy): after SGLang
allocated a batch's token ids, give them rows in each request's own pages.

SGLang's allocator hands out ids for a whole batch; only here, after ``prepare_for_extend`` /
``prepare_for_decode`` wrote them into ``req_to_token``, is it known which request each id is
for and which token it follows. :meth:`PagedRowTable.place` does the bookkeeping.
"""

from __future__ import annotations

import torch

from ..memory.paged_table import PagedRowTable
from ..memory.pool import DkvAllocator


def _paged_table(batch) -> PagedRowTable | None:
    allocator = batch.token_to_kv_pool_allocator
    if not isinstance(allocator, DkvAllocator) or not isinstance(allocator.table, PagedRowTable):
        return None
    return allocator.table


def place_extend(batch) -> None:
    """After ``prepare_for_extend``: request i's new ids follow its ``prefix_lens[i]`` tokens."""
    table = _paged_table(batch)
    if table is None or batch.out_cache_loc is None or len(batch.reqs) == 0:
        return
    tree = batch.tree_cache
    if tree is not None and tree.supports_prefix_sharing():
        raise RuntimeError("dkv-sglang: --page-size > 1 needs --disable-radix-cache (the launcher sets it)")
    req_to_token = batch.req_to_token_pool.req_to_token
    rpis = batch.req_pool_indices_cpu.tolist() if batch.req_pool_indices_cpu is not None else batch.req_pool_indices.tolist()
    prefix = [int(p) for p in batch.prefix_lens]
    counts = [int(n) for n in batch.extend_lens]
    prev = torch.tensor(
        [int(req_to_token[r, p - 1]) if p > 0 else 0 for r, p in zip(rpis, prefix)], dtype=torch.int64
    )
    table.place(prev, counts, batch.out_cache_loc)


def place_decode(batch) -> None:
    """After ``prepare_for_decode`` (seq_lens already counts the new token): one id per request,
    following the token before it."""
    table = _paged_table(batch)
    if table is None or batch.out_cache_loc is None or len(batch.reqs) == 0:
        return
    req_to_token = batch.req_to_token_pool.req_to_token
    rpis = batch.req_pool_indices.long()
    prev = req_to_token[rpis, batch.seq_lens.long() - 2].long()
    table.place(prev, [1] * len(rpis), batch.out_cache_loc)
