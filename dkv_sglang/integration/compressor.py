"""After a prefill batch: run the policy for each request whose prompt is now whole, and
drop the rows it does not keep (scheduler process, between forward passes). Each request
runs the server's policy unless its ``custom_params`` choose another (checked on arrival)."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
import torch

from ..attention.page_table import host_ints
from ..memory.pool import DkvAllocator, PrefillPlan
from ..memory.row_table import RowTable
from ..policy import PolicyConfig, Selection, select_batch
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
    slots = host_ints(batch.req_pool_indices_cpu, batch.req_pool_indices)
    seq_lens = host_ints(batch.seq_lens_cpu, batch.seq_lens)
    allocator.get_kvcache().kept.append(slots, batch.out_cache_loc, seq_lens)


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


@dataclass
class Job:
    """One request this prefill batch completed, to be cut."""

    req: object
    rpi: int
    seq_len: int
    plan: PrefillPlan
    selection: Selection | None = None
    counts: np.ndarray | None = None  # [L, H] host: rows each of this rank's heads keeps

    @functools.cached_property
    def positions(self) -> torch.Tensor:
        """What the cut and the index read (:func:`_positions`), built once."""
        return _positions(self.selection, self.seq_len)


def _positions(selection: Selection, seq_len: int) -> torch.Tensor:
    """[L, H, W] what each (layer, head) of a compressed request reads, compact: its kept prompt
    positions (ascending), then every position past the prompt (a replayed request's generated
    tokens); the rest of a row repeats a kept position and is never read (``counts``)."""
    pos = selection.positions
    n = selection.prompt_len
    extra = seq_len - n
    if extra <= 0:
        return pos
    L, H, W = pos.shape
    out = torch.cat([pos, pos.new_full((L, H, extra), n - 1)], dim=2)
    cols = selection.counts.to(pos.device)[:, :, None] + torch.arange(extra, device=pos.device)
    return out.scatter_(2, cols, (n + torch.arange(extra, device=pos.device)).expand(L, H, extra).contiguous())


def _choose(jobs: list[Job], recorded: dict, reducer) -> None:
    """Run the policy for every job that chooses, requests of the same policy and prompt length
    together (one batched selection each)."""
    groups: dict = {}
    for job in jobs:
        if job.selection is None:
            groups.setdefault((job.plan.config, job.seq_len), []).append(job)
    for (config, seq_len), members in groups.items():
        scores = torch.stack([torch.stack(recorded[j.rpi][1]) for j in members])  # [R, L, H, p]
        for job, chosen in zip(members, select_batch(scores, seq_len, config, reducer)):
            job.selection = chosen


def _jobs(batch, pool, recorded) -> list[Job]:
    """The requests of ``batch`` whose prefill this forward completed and that the policy cuts
    (or a retracted request's replay cuts again)."""
    jobs = []
    for req, seq_len in zip(batch.reqs, host_ints(batch.seq_lens_cpu, batch.seq_lens).tolist()):
        rpi = req.kv.req_pool_idx
        plan = pool.plan_of(rpi)
        if plan is None or not prefill_is_complete(req, seq_len):
            continue
        pool.end_plan(rpi)
        if plan.replay is not None:
            jobs.append(Job(req, rpi, seq_len, plan, plan.replay))
        elif plan.chooses(seq_len) and _complete(recorded.get(rpi), seq_len):
            jobs.append(Job(req, rpi, seq_len, plan))
    return jobs


def _host_counts(selection: Selection, heads: int, rank: int) -> np.ndarray:
    """[L, H] rows each of this rank's heads keeps, from the selection's host-side counts."""
    return np.asarray(selection.kept_per_head, dtype=np.int64)[:, rank * heads : (rank + 1) * heads]


def cuts_after(batch, allocator) -> bool:
    """Whether processing this extend batch's result may cut a request, known before the result
    is: some request's prefill plan chooses (or replays a selection) and this forward ends its
    prefill. Over-approximates :func:`_jobs` (a request that finishes here is not cut)."""
    if not isinstance(allocator, DkvAllocator) or not batch.forward_mode.is_extend():
        return False
    pool = allocator.get_kvcache()
    for req, seq_len in zip(batch.reqs, host_ints(batch.seq_lens_cpu, batch.seq_lens).tolist()):
        plan = pool.plan_of(req.kv.req_pool_idx)
        ends = seq_len == len(req.origin_input_ids) + len(req.output_ids)  # its first token comes now
        if plan is not None and ends and (plan.replay is not None or plan.chooses(seq_len)):
            return True
    return False


def compress_batch(batch, config: PolicyConfig, tree_cache=None, allocator=None) -> None:
    """After an extend batch: cut every request whose prefill is now complete.

    The policy runs once per group of requests with the same policy and prompt length
    (:func:`_choose`); the requests whose every row is their own (no prefix-cache hit, rows not
    paged) are then cut together (:func:`_cut_together`): a fixed number of ops for the batch
    and one host read (the tokens each keeps somewhere). With SGLang's prefix cache on and a
    prompt that matched a cached prefix, the request gets its own copies of the rows it keeps,
    and its compressed ids never go into the cache (``skip_radix_cache_insert``).
    ``allocator``: the scheduler's (the batch copy SGLang's overlap loop processes has none).
    """
    tree_cache = tree_cache if tree_cache is not None else batch.tree_cache
    allocator = allocator if allocator is not None else batch.token_to_kv_pool_allocator
    if not isinstance(allocator, DkvAllocator):
        return
    pool = allocator.get_kvcache()
    seq_lens = host_ints(batch.seq_lens_cpu, batch.seq_lens).tolist()
    recorded = pool.take_scores({req.kv.req_pool_idx: n for req, n in zip(batch.reqs, seq_lens)})
    jobs = _jobs(batch, pool, recorded)
    if not jobs:
        return
    compress_jobs(jobs, recorded, allocator, tree_cache, batch.req_to_token_pool.req_to_token, tp_reducer())


def compress_jobs(jobs: list[Job], recorded: dict, allocator: DkvAllocator, tree_cache, req_to_token, reducer) -> None:
    """Choose, cut and index ``jobs`` (what :func:`compress_batch` does once it has them)."""
    _choose(jobs, recorded, reducer)
    jobs = [j for j in jobs if j.selection is not None]
    table = allocator.table
    pool = allocator.get_kvcache()
    for job in jobs:
        job.counts = _host_counts(job.selection, table.num_heads, reducer.rank)
    together = [j for j in jobs if j.req.kv.cache_protected_len == 0 and type(table) is RowTable]
    alone = [j for j in jobs if j not in together]
    done = _cut_together(together, allocator, req_to_token) if together else []
    for job in alone:
        if _cut_alone(job, allocator, tree_cache, req_to_token):
            done.append(job)
    if not done:
        return
    _index(done, pool, table, req_to_token)
    for job in done:
        req, selection = job.req, job.selection
        req.skip_radix_cache_insert = True
        setattr(req, REPLAY_ATTR, selection)
        record_compression(allocator, selection.prompt_len, selection.kept_per_layer)
        req.customized_info = {
            **(req.customized_info or {}),
            "kv_kept_per_layer": selection.kept_per_layer,
            "kv_prompt_tokens": selection.prompt_len,
        }


def _keep_masks(jobs: list[Job], L: int, H: int, width: int, device) -> torch.Tensor:
    """[R, L, H, width] bool: each request's kept positions, and every position past its prompt
    (a replay's generated tokens) up to its sequence length; False past it."""
    pos = _stack([j.positions for j in jobs])
    keep = torch.zeros(len(jobs), L, H, width, dtype=torch.bool, device=device)
    return keep.scatter_(3, pos.to(device), True)


def _stack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """[R, ..., W] the tensors padded at the end of their last dim with their own last entry."""
    width = max(t.shape[-1] for t in tensors)
    if all(t.shape == tensors[0].shape for t in tensors):  # one policy and length: one op
        return torch.stack(tensors)
    return torch.stack([torch.cat([t, t[..., -1:].expand(*t.shape[:-1], width - t.shape[-1])], dim=-1)
                        for t in tensors])


def _cut_together(jobs: list[Job], allocator: DkvAllocator, req_to_token) -> list[Job]:
    """Cut requests whose every row is their own, all at once: drop the rows no head keeps,
    give back the ids of tokens no (layer, head) keeps, write the new ids into ``req_to_token``.
    The host knows how many rows go (from the selections' host counts); one read of the batch
    tells how many tokens each keeps somewhere."""
    table = allocator.table
    L, H, device = table.num_layers, table.num_heads, table.row_of.device
    seq_lens = np.array([j.seq_len for j in jobs], dtype=np.int64)
    width = int(seq_lens.max())
    keep = _keep_masks(jobs, L, H, width, device)
    slots = torch.tensor([j.rpi for j in jobs], dtype=torch.int64, device=req_to_token.device)
    old = req_to_token.index_select(0, slots)[:, :width].to(device, torch.int64)  # [R, width]
    valid = torch.arange(width, device=device)[None, :] < torch.from_numpy(seq_lens).to(device)[:, None]
    vids = torch.where(valid, old, torch.full_like(old, table.hole))  # past a sequence: the hole (no row)
    somewhere = keep.flatten(1, 2).any(dim=1) & valid  # [R, width]
    kept_tokens = somewhere.sum(dim=1).cpu().numpy()  # the one host read
    kept_rows = np.array([j.counts.sum() + L * H * (j.seq_len - j.selection.prompt_len) for j in jobs])
    freed = L * H * seq_lens - kept_rows
    new = table.cut(vids.reshape(-1), keep.permute(1, 2, 0, 3).reshape(L, H, -1) | ~valid.reshape(-1),
                    int(freed.sum()), int((seq_lens - kept_tokens).sum()))
    req_to_token[slots, :width] = torch.where(valid, new.view(len(jobs), width), old).to(req_to_token.dtype)
    for job, rows in zip(jobs, freed.tolist()):
        allocator.record(job.req.rid, job.selection, rows, replayed=job.plan.replay is not None)
    return jobs


def _cut_alone(job: Job, allocator: DkvAllocator, tree_cache, req_to_token) -> bool:
    """Cut one request some of whose rows the prefix cache owns (or whose rows are paged): the
    general path, which reads the device."""
    table = allocator.table
    req, rpi, seq_len, selection = job.req, job.rpi, job.seq_len, job.selection
    keep = _keep_masks([job], table.num_layers, table.num_heads, seq_len, table.row_of.device)[0]
    vids = req_to_token[rpi, :seq_len].to(torch.int64)
    shared = req.kv.cache_protected_len
    released = _take_from_prefix_cache(req, allocator, tree_cache, req_to_token, vids, keep)
    if released is None:
        logger.warning("dkv: %s stays uncompressed: no free rows to copy its kept rows to", req.rid)
        return False
    vids = req_to_token[rpi, :seq_len].to(torch.int64)
    allocator.compress(req.rid, vids[shared:], keep[:, :, shared:], selection,
                       replayed=job.plan.replay is not None, released=released)
    req_to_token[rpi, :seq_len] = table.release_unheld(vids).to(req_to_token.dtype)
    return True


def _index(jobs: list[Job], pool, table, req_to_token) -> None:
    """Index every cut request's kept rows (what decode reads) in one build."""
    L, H, device = table.num_layers, table.num_heads, table.row_of.device
    width = max(j.seq_len for j in jobs)
    slots = torch.tensor([j.rpi for j in jobs], dtype=torch.int64, device=req_to_token.device)
    vids = req_to_token.index_select(0, slots)[:, :width].to(device, torch.int64)  # [R, width]
    pos = _stack([j.positions for j in jobs]).to(device)  # [R, L, H, W]
    at = vids.gather(1, pos.reshape(len(jobs), -1)).view(pos.shape)
    rows = table.row_of[torch.arange(L, device=device)[None, :, None, None],
                        torch.arange(H, device=device)[None, None, :, None], at]
    counts = np.stack([j.counts + (j.seq_len - j.selection.prompt_len) for j in jobs])
    room = max(min(max((j.req.sampling_params.max_new_tokens or 0) - len(j.req.output_ids) + 1, 1), 256)
               for j in jobs)
    pool.kept.build([j.rpi for j in jobs], rows, counts, [j.seq_len for j in jobs], room)
