"""After a prefill batch: run the policy for each request whose prompt is now whole, and
drop the rows it does not keep (scheduler process, between forward passes)."""

from __future__ import annotations

import logging

from ..memory.pool import DkvAllocator
from ..policy import PolicyConfig, select

logger = logging.getLogger(__name__)


def prefill_is_complete(req, seq_len: int) -> bool:
    """True when this forward ended the request's prefill: its whole sequence so far is in
    the cache and the first new token was sampled (a middle chunk samples nothing)."""
    return (
        not req.finished()
        and not req.is_retracted
        and req.kv.holds_kv
        and len(req.output_ids) >= 1
        and seq_len == len(req.origin_input_ids) + len(req.output_ids) - 1
    )


def compress_batch(batch, config: PolicyConfig) -> None:
    allocator = batch.token_to_kv_pool_allocator
    if not isinstance(allocator, DkvAllocator):
        return
    recorded = allocator.get_kvcache().take_scores()
    if not recorded:
        return
    req_to_token = batch.req_to_token_pool.req_to_token
    for req in batch.reqs:
        entry = recorded.get(req.kv.req_pool_idx)
        if entry is None:
            continue
        seq_len, scores = entry
        if not prefill_is_complete(req, seq_len) or any(s is None for s in scores):
            continue
        selection = select(scores, seq_len, config)
        if selection is None:
            continue
        vids = req_to_token[req.kv.req_pool_idx, :seq_len].to(int)
        freed = allocator.compress(req.rid, vids, selection.keep_mask(), selection.kept_per_layer)
        logger.debug("dkv: %s kept %s of %d tokens, freed %d rows", req.rid, selection.kept_per_layer, seq_len, freed)
