"""After a prefill batch: run the policy for each request whose prompt is now whole, and
drop the rows it does not keep (scheduler process, between forward passes). Each request
runs the server's policy unless its ``custom_params`` choose another (checked on arrival)."""

from __future__ import annotations

import logging

import torch

from ..memory.pool import DkvAllocator, PrefillPlan
from ..policy import PolicyConfig, select
from ..policy.request import for_request
from .metrics import record_compression

logger = logging.getLogger(__name__)

# The selection a request made, kept on SGLang's Req so a retracted request replays it.
REPLAY_ATTR = "dkv_selection"
# What a compressed request reports in its response's meta_info (once, not per token).
META_KEYS = ("kv_kept_per_layer", "kv_prompt_tokens")


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


def _complete(entry, seq_len: int) -> bool:
    """Scores were recorded for this whole prompt, in every layer."""
    return entry is not None and entry[0] == seq_len and all(s is not None for s in entry[1])


def index_decode(batch) -> None:
    """After ``prepare_for_decode`` (rows placed): each compressed request's index takes the
    rows of its new token."""
    allocator = batch.token_to_kv_pool_allocator
    if not isinstance(allocator, DkvAllocator) or batch.out_cache_loc is None:
        return
    slots = batch.req_pool_indices.tolist()
    allocator.get_kvcache().kept.append(slots, batch.out_cache_loc, batch.seq_lens.tolist())


def plan_batch(batch, config: PolicyConfig) -> None:
    """Before an extend batch runs: tell the pool what each request's prefill does."""
    allocator = batch.token_to_kv_pool_allocator
    if not isinstance(allocator, DkvAllocator):
        return
    pool = allocator.get_kvcache()
    for req in batch.reqs:
        plan = PrefillPlan(
            config=for_request(config, req.sampling_params.custom_params),
            replay=getattr(req, REPLAY_ATTR, None),
            prompt_len=len(req.origin_input_ids),
        )
        pool.set_plan(req.kv.req_pool_idx, plan)


def _take_from_prefix_cache(req, allocator: DkvAllocator, tree_cache, req_to_token, vids, keep) -> int | None:
    """Give the request its own copies of the kept rows of the prompt ids the prefix cache
    owns (``req.kv.cache_protected_len`` of them) and unlock them there: the cache keeps the
    whole prompt for later requests, evictable like any cached prefix.

    Returns the head-rows handed back to the cache, or None when no rows are free for the
    copies even after evicting (the request then stays uncompressed).
    """
    shared = req.kv.cache_protected_len
    if shared == 0:
        return 0
    keep = keep[:, :, :shared]
    new_vids = allocator.fork(vids[:shared], keep)
    if new_vids is None:
        # Evict unlocked cached prefixes until the copies' rows and ids fit.
        rows, ids = allocator.table.fork_need(vids[:shared], keep)
        allocator.evict_to_free_tokens(tree_cache, max(-(-rows // allocator.table.head_rows_per_token), ids))
        new_vids = allocator.fork(vids[:shared], keep)
    if new_vids is None:
        return None
    req_to_token[req.kv.req_pool_idx, :shared] = new_vids.to(req_to_token.dtype)
    tree_cache.unlock(req.lock)
    req.lock = None
    req.kv.cache_protected_len = 0
    return shared * allocator.table.head_rows_per_token - int(keep.sum())


def compress_batch(batch, config: PolicyConfig, tree_cache=None) -> None:
    """After an extend batch: cut every request whose prefill is now complete.

    With SGLang's prefix cache on, the prompt was just inserted there whole (its ids are the
    cache's); the request gets its own copies of the rows it keeps, and its compressed ids
    never go into the cache (``skip_radix_cache_insert``).
    """
    tree_cache = tree_cache if tree_cache is not None else batch.tree_cache
    allocator = batch.token_to_kv_pool_allocator
    if not isinstance(allocator, DkvAllocator):
        return
    pool = allocator.get_kvcache()
    recorded = pool.take_scores()
    req_to_token = batch.req_to_token_pool.req_to_token
    reducer = tp_reducer()
    for req, seq_len in zip(batch.reqs, batch.seq_lens_cpu.tolist()):
        rpi = req.kv.req_pool_idx
        plan = pool.plan_of(rpi)
        if plan is None:
            continue
        if not prefill_is_complete(req, seq_len):
            continue
        pool.end_plan(rpi)
        if plan.replay is not None:
            selection = plan.replay
        elif plan.chooses(seq_len) and _complete(recorded.get(rpi), seq_len):
            selection = select(recorded[rpi][1], seq_len, plan.config, reducer)
        else:
            continue
        if selection is None:
            continue
        vids = req_to_token[rpi, :seq_len].to(int)
        keep = torch.ones(allocator.table.num_layers, allocator.table.num_heads, seq_len, dtype=torch.bool)
        keep[:, :, : selection.prompt_len] = selection.keep_mask()
        shared = req.kv.cache_protected_len
        released = _take_from_prefix_cache(req, allocator, tree_cache, req_to_token, vids, keep)
        if released is None:
            logger.warning("dkv: %s stays uncompressed: no free rows to copy its kept rows to", req.rid)
            continue
        req.skip_radix_cache_insert = True
        freed = allocator.compress(
            req.rid, vids[shared:], keep[:, :, shared:], selection, replayed=plan.replay is not None, released=released
        )
        # Tokens no layer keeps give their ids back (they read as the hole from now on).
        req_to_token[rpi, shared:seq_len] = allocator.table.release_unheld(vids[shared:]).to(req_to_token.dtype)
        room = min(max((req.sampling_params.max_new_tokens or 0) - len(req.output_ids) + 1, 1), 256)
        pool.kept.build(rpi, req_to_token[rpi, :seq_len], room)
        setattr(req, REPLAY_ATTR, selection)
        record_compression(allocator, selection.prompt_len, selection.kept_per_layer)
        req.customized_info = {
            **(req.customized_info or {}),
            "kv_kept_per_layer": selection.kept_per_layer,
            "kv_prompt_tokens": selection.prompt_len,
        }
        logger.debug("dkv: %s kept %s of %d tokens, freed %d rows", req.rid, selection.kept_per_layer, seq_len, freed)
