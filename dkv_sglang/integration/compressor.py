"""After a prefill batch: run the policy for each request whose prompt is now whole, and
drop the rows it does not keep (scheduler process, between forward passes). Each request
runs the server's policy unless its ``custom_params`` choose another (checked on arrival)."""

from __future__ import annotations

import logging

from ..memory.pool import DkvAllocator
from ..policy import PolicyConfig, select
from ..policy.request import for_request

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


def tp_reducer():
    """The attention tensor-parallel group, when this scheduler holds a shard of the heads.

    Every rank runs this step on the same batch in the same order, so the collectives of
    DynamicKV's budget updates line up across ranks.
    """
    from sglang.srt.distributed.parallel_state import get_attn_tp_group

    from ..policy.reduce import LOCAL, DistReducer

    group = get_attn_tp_group()
    return DistReducer(group.cpu_group) if group.world_size > 1 else LOCAL


def compress_batch(batch, config: PolicyConfig) -> None:
    allocator = batch.token_to_kv_pool_allocator
    if not isinstance(allocator, DkvAllocator):
        return
    recorded = allocator.get_kvcache().take_scores()
    if not recorded:
        return
    req_to_token = batch.req_to_token_pool.req_to_token
    reducer = tp_reducer()
    for req in batch.reqs:
        entry = recorded.get(req.kv.req_pool_idx)
        if entry is None:
            continue
        seq_len, scores = entry
        if not prefill_is_complete(req, seq_len) or any(s is None for s in scores):
            continue
        request_config = for_request(config, req.sampling_params.custom_params)
        selection = select(scores, seq_len, request_config, reducer) if request_config.compresses else None
        if selection is None:
            continue
        vids = req_to_token[req.kv.req_pool_idx, :seq_len].to(int)
        freed = allocator.compress(req.rid, vids, selection.keep_mask(), selection.kept_per_layer)
        logger.debug("dkv: %s kept %s of %d tokens, freed %d rows", req.rid, selection.kept_per_layer, seq_len, freed)
