"""SGLang's overlap scheduler with a compressing policy: the same greedy tokens and kept rows
as with ``disable_overlap_schedule``.

One engine per setting runs one script: the shared prompts batched, the other policies per
request (``custom_params``), ``n > 1``, a stream, an abort mid-stream and a shared document
asked twice (a radix-cache hit), all arriving while others decode, with chunked prefill; then a
burst that a small pool must retract. Both engines must answer token for token and keep row
for row the same, and end with the pool at idle (SGLang's strict idle check on).
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import deque

import pytest

from .conftest import ENGINE_ARGS, SAMPLING

pytestmark = pytest.mark.engine

BUDGET = 32
CHUNK = 128  # the 400- and 230-token prompts are prefilled in several chunks
OTHER_POLICIES = ("snapkv", "pyramidkv", "streamingllm")
RETRACT = {"max_new_tokens": 400, "temperature": 0}  # as tests/engine/test_retraction.py
POOL = 1100  # six 300-token prompts need ~2600 tokens by their end: retraction


def _script_inputs(prompts):
    rng = random.Random(7)
    doc = [rng.randrange(100, 40000) for _ in range(300)]
    turns = [doc + [rng.randrange(100, 40000) for _ in range(n)] for n in (20, 30)]
    rng = random.Random(1)
    burst = [[rng.randrange(100, 40000) for _ in range(300)] for _ in range(6)]
    return prompts, turns, burst


async def _script(engine, prompts, turns, burst):
    out = {}

    async def plain(key, ids, sampling, rid=None, delay=0.0):
        await asyncio.sleep(delay)
        got = await engine.async_generate(input_ids=ids, sampling_params=sampling, rid=rid)
        got = got if isinstance(got, list) else [got]
        out[key] = [(o["output_ids"], o["meta_info"].get("kv_kept_per_layer")) for o in got]

    async def streamed(key, ids, rid, delay):
        await asyncio.sleep(delay)
        chunks = [c async for c in await engine.async_generate(input_ids=ids, sampling_params=SAMPLING,
                                                               rid=rid, stream=True)]
        out[key] = (chunks[-1]["output_ids"], chunks[-1]["meta_info"].get("kv_kept_per_layer"))

    async def aborted(ids, rid, delay):
        await asyncio.sleep(delay)
        sampling = {"max_new_tokens": 2000, "temperature": 0, "ignore_eos": True}
        seen = 0
        async for chunk in await engine.async_generate(input_ids=ids, sampling_params=sampling, rid=rid, stream=True):
            seen += 1
            if seen == 3:
                engine.tokenizer_manager.abort_request(rid)
        out["aborted"] = chunk["meta_info"]["finish_reason"]

    async def cached(delay):
        for i, turn in enumerate(turns):
            await plain(f"turn{i}", turn, SAMPLING, rid=f"turn-{i:04d}", delay=delay)

    await asyncio.gather(
        plain("batched", prompts, SAMPLING, rid=[f"batch-{i:04d}" for i in range(len(prompts))]),
        *(plain(p, prompts[0], {**SAMPLING, "custom_params": {"kv_policy": p}}, rid=f"{p[:5]}-0000", delay=0.1)
          for p in OTHER_POLICIES),
        plain("n2", prompts[1], {**SAMPLING, "n": 2}, delay=0.3),
        streamed("stream", prompts[2], "strm-0000", 0.3),
        aborted(prompts[0][::-1], "abort-0000", 0.3),
        cached(0.2),
    )
    await plain("burst", burst, RETRACT, rid=[f"burst-{i:04d}" for i in range(len(burst))])
    await asyncio.sleep(1.0)  # the scheduler goes idle and runs SGLang's strict idle check
    return out


def _run(model, prompts, overlap: bool):
    import dkv_sglang

    # SGLang admits assuming each running request needs this share of its remaining tokens:
    # a low guess over-admits, so decode runs out of rows and must retract.
    os.environ["SGLANG_INIT_NEW_TOKEN_RATIO"] = "0.05"
    try:
        engine = dkv_sglang.Engine(model_path=model, kv_policy="dynamickv", kv_budget=BUDGET,
                                   chunked_prefill_size=CHUNK, disable_overlap_schedule=not overlap,
                                   **{**ENGINE_ARGS, "max_total_tokens": POOL})
    finally:
        del os.environ["SGLANG_INIT_NEW_TOKEN_RATIO"]
    try:
        out = engine.loop.run_until_complete(_script(engine, *_script_inputs(prompts)))
        out["stats"] = engine.dkv_stats()
        out["overlap"] = not engine.server_args.disable_overlap_schedule
        return out
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def runs(tiny_model, prompts):
    return {overlap: _run(tiny_model, prompts, overlap) for overlap in (True, False)}


def _outputs(run):
    return {k: v for k, v in run.items() if k not in ("stats", "overlap")}


def _kept_per_request(stats):
    """Each request's first selection (a replay repeats it); n > 1 samples have random rids."""
    first = {}
    for r in stats["recent"]:
        first.setdefault(r["rid"], r["kv_kept_per_head"])
    named = {rid: kept for rid, kept in first.items() if "-" in rid}
    return named, sorted(first.values())


def test_overlap_is_on_by_default_and_off_when_asked(runs):
    assert runs[True]["overlap"] and not runs[False]["overlap"]


def test_same_tokens_and_kept_rows_with_overlap_on_and_off(runs, prompts):
    on, off = _outputs(runs[True]), _outputs(runs[False])
    assert on.pop("aborted")["type"] == "abort" and off.pop("aborted")["type"] == "abort"
    assert on == off
    assert len(on["batched"]) == len(prompts) and len(on["n2"]) == 2 and len(on["burst"]) == 6
    assert all(kept is not None for _, kept in on["batched"][:3]), "the long prompts were compressed"
    assert all(len(tokens) == RETRACT["max_new_tokens"] for tokens, _ in on["burst"])
    assert all(on[p][0][1] is not None for p in OTHER_POLICIES), "each request's own policy compressed it"
    assert _kept_per_request(runs[True]["stats"]) == _kept_per_request(runs[False]["stats"])


def test_both_retract_and_end_idle(runs):
    for run in runs.values():
        stats = run["stats"]
        assert stats["retracted_requests"] > 0, "the small pool forced retraction"
        assert any(r["replayed"] for r in stats["recent"]), "a retracted request was cut again"
        assert stats["pool_rows_free"] + stats["pool_rows_cached"] == stats["pool_rows_total"]
        assert stats["running_requests"] == 0
        assert stats["kept_index_entries"] == 0, "finished, aborted and retracted requests' entries are free"


def test_a_cutting_prefill_is_processed_before_the_next_batch_is_prepared(monkeypatch):
    """The ordering itself, on a stand-in scheduler: a queued prefill result that cuts is
    processed before the next batch is built (and the loop's own pop skips it); any other
    result is left for the loop to process after the next launch."""
    from dkv_sglang.integration import compressor, overlap

    events = []

    class Scheduler:
        enable_overlap = True
        token_to_kv_pool_allocator = None

        def __init__(self, queued):
            self.result_queue = deque([(queued, "result")])

        def process_batch_result(self, batch, result):
            overlap._skip_processed(lambda s, b, r: events.append(("process", b)), self, batch, result)

    monkeypatch.setattr(compressor, "cuts_after", lambda batch, allocator: batch == "cutting prefill")
    prepare = lambda scheduler, *args: events.append(("prepare next",))  # noqa: E731
    cutting = Scheduler("cutting prefill")
    overlap._cut_before_next_batch(prepare, cutting, None, None)
    assert events == [("process", "cutting prefill"), ("prepare next",)]
    cutting.process_batch_result(*cutting.result_queue.popleft())  # the loop's pop: nothing more
    assert events == [("process", "cutting prefill"), ("prepare next",)]

    events.clear()
    decode = Scheduler("decode")
    overlap._cut_before_next_batch(prepare, decode, None, None)
    assert events == [("prepare next",)] and decode.result_queue[0] == ("decode", "result")
