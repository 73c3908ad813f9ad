"""SGLang's overlap scheduler with a compressing policy: a prefill batch that cuts a request has
its result processed before the next batch is prepared; every other step overlaps as in SGLang.

``Scheduler.event_loop_overlap`` prepares and launches batch N+1, then processes batch N's
result. After a prefill batch that would let the next (decode) batch read the just-prefilled
requests' whole rows before the compression (which runs in the prefill's result processing)
cuts them: other tokens than the overlap-off server's, and rows the cut frees handed out while
that decode may still read them. So, before the next batch is prepared
(``get_next_batch_to_run``), a queued prefill result that cuts (:func:`compressor.cuts_after`)
is processed there, in the order ``event_loop_normal`` uses; the queue keeps a processed marker
in its place, which the loop's own pop then skips. No forward is in flight while the cut runs
(processing the result waited for the prefill), and the next batch is built over the cut rows.
"""

from __future__ import annotations

_NEXT_BATCH = "sglang.srt.managers.scheduler.Scheduler.get_next_batch_to_run"
_PROCESS = "sglang.srt.managers.scheduler.Scheduler.process_batch_result"


class _Processed:
    """The result of a queued batch that was processed ahead of the loop."""


PROCESSED = _Processed()


def register(registry, hook_type) -> None:
    registry.register(_NEXT_BATCH, _cut_before_next_batch, hook_type.AROUND)
    registry.register(_PROCESS, _skip_processed, hook_type.AROUND)


def _cut_before_next_batch(original, scheduler, *args, **kwargs):
    queue = scheduler.result_queue
    if scheduler.enable_overlap and queue and queue[0][1] is not PROCESSED:
        from .compressor import cuts_after

        batch, result = queue[0]
        if cuts_after(batch, scheduler.token_to_kv_pool_allocator):
            queue.popleft()
            scheduler.process_batch_result(batch, result)
            queue.appendleft((_empty_batch(), PROCESSED))
    return original(scheduler, *args, **kwargs)


def _skip_processed(original, scheduler, batch, result, *args, **kwargs):
    if result is PROCESSED:
        return None
    return original(scheduler, batch, result, *args, **kwargs)


def _empty_batch():
    """The marker's batch: no requests (the loop reads the queued batch's requests to skip
    decoding those whose queued result finishes them; this one's are already processed)."""
    from sglang.srt.managers.schedule_batch import ScheduleBatch

    return ScheduleBatch(reqs=[], batch_is_full=False)
