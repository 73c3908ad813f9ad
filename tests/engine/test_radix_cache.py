"""SGLang's radix prefix cache with a compressing policy: shared prefixes are cache hits, and a
hit keeps exactly the rows and tokens a miss would.

The cache keeps each prompt whole (all layers, all rows); a compressed request copies out the
rows it keeps and never inserts its compressed ids. Reference: the same requests on an engine
started with ``--disable-radix-cache``.
"""

from __future__ import annotations

import random

import pytest

from .conftest import ENGINE_ARGS, SAMPLING, TINY_LAYERS

pytestmark = pytest.mark.engine

BUDGET = 32
WINDOW = 8  # the policy's default window: always prefilled, never taken from the cache
DOC = 300  # a shared document, then different questions
OTHER_POLICIES = ("snapkv", "pyramidkv", "streamingllm")


@pytest.fixture(scope="module")
def turns():
    rng = random.Random(7)
    doc = [rng.randrange(100, 40000) for _ in range(DOC)]
    q1 = doc + [rng.randrange(100, 40000) for _ in range(20)]
    q2 = doc + [rng.randrange(100, 40000) for _ in range(30)]
    short = doc[:20]  # under the budget: served whole, cached like vanilla SGLang
    return [q1, q2, list(q1), short, list(q2)]


def _run(model, turns, **options):
    import dkv_sglang

    engine = dkv_sglang.Engine(model_path=model, kv_policy="dynamickv", kv_budget=BUDGET, **options, **ENGINE_ARGS)
    try:
        # one request at a time: each turn may hit what the earlier ones left in the cache
        outs = [engine.generate(input_ids=t, sampling_params=SAMPLING) for t in turns]
        burst = engine.generate(input_ids=turns, sampling_params=SAMPLING)  # all at once, all cached
        stats = engine.dkv_stats()
        # the other policies, per request, twice each: hits, since q2 was asked before
        others = [engine.generate(input_ids=turns[1], sampling_params={**SAMPLING, "custom_params": {"kv_policy": p}})
                  for p in OTHER_POLICIES for _ in range(2)]
        return outs, burst, stats, others
    finally:
        engine.shutdown()


@pytest.fixture(scope="module")
def cached(tiny_model, turns):
    return _run(tiny_model, turns)


@pytest.fixture(scope="module")
def uncached(tiny_model, turns):
    return _run(tiny_model, turns, disable_radix_cache=True)


def test_shared_prefixes_are_cache_hits(cached, turns):
    outs, burst, _, _ = cached
    hits = [o["meta_info"]["cached_tokens"] for o in outs]
    assert hits[0] == 0
    assert hits[1] == DOC, "the second question reuses the whole document"
    assert hits[2] == len(turns[2]) - WINDOW, "a repeat reuses all but the window the policy scores with"
    assert hits[3] == len(turns[3]) - 1, "a prompt under the budget is cached as in vanilla SGLang"
    assert all(o["meta_info"]["cached_tokens"] >= DOC for o in burst[:3] + burst[4:])


def test_a_hit_keeps_the_rows_and_tokens_of_a_miss(cached, uncached):
    outs, burst, _, _ = cached
    ref_outs, ref_burst, _, _ = uncached
    for mine, ref in zip(outs + burst, ref_outs + ref_burst):
        assert mine["output_ids"] == ref["output_ids"]
        assert mine["meta_info"].get("kv_kept_per_layer") == ref["meta_info"].get("kv_kept_per_layer")
    kept = [o["meta_info"].get("kv_kept_per_layer") for o in outs]
    assert kept[0] is not None and kept[3] is None, "long prompts were compressed, the short one not"
    assert kept[0] == kept[2], "a repeat chooses the same rows"


def test_compressed_requests_hold_their_own_rows_and_the_cache_keeps_prompts_whole(cached, uncached):
    _, _, stats, _ = cached
    L = TINY_LAYERS
    compressed = [r for r in stats["recent"]]
    assert len(compressed) == 8  # q1, q2, q1 alone, then again in the burst (the short one never)
    for r in compressed:
        assert r["rows_freed"] == r["prompt_tokens"] * L - sum(r["kept_per_layer"])
    # idle: every row is free or in the cache, which holds the long prompts whole
    assert stats["pool_rows_free"] + stats["pool_rows_cached"] == stats["pool_rows_total"]
    assert stats["kept_index_entries"] == 0
    assert stats["pool_rows_cached"] >= (DOC + 20 + 30) * L
    assert uncached[2]["pool_rows_cached"] == 0


def test_every_policy_keeps_the_same_rows_and_tokens_on_a_hit(cached, uncached, turns):
    others, ref = cached[3], uncached[3]
    for i, policy in enumerate(p for p in OTHER_POLICIES for _ in range(2)):
        mine = others[i]
        assert mine["meta_info"]["cached_tokens"] == len(turns[1]) - WINDOW, policy  # q2 was asked before
        assert mine["output_ids"] == ref[i]["output_ids"], policy
        assert mine["meta_info"]["kv_kept_per_layer"] == ref[i]["meta_info"]["kv_kept_per_layer"], policy
    assert ref[0]["meta_info"]["cached_tokens"] == 0


@pytest.fixture(scope="module")
def evicting(tiny_model):
    """A pool of 1,400 tokens: four distinct 330-token prompts at a time, so the cache must
    give back earlier prompts (and the requests' copies need room) as new ones arrive."""
    import dkv_sglang

    rng = random.Random(3)
    prompts = [[rng.randrange(100, 40000) for _ in range(330)] for _ in range(10)]
    args = {**ENGINE_ARGS, "max_total_tokens": 1400}
    out = {}
    for name, extra in (("cached", {}), ("uncached", {"disable_radix_cache": True})):
        engine = dkv_sglang.Engine(model_path=tiny_model, kv_policy="dynamickv", kv_budget=BUDGET, **extra, **args)
        try:
            first = engine.generate(input_ids=prompts, sampling_params=SAMPLING)
            again = engine.generate(input_ids=prompts[::-1], sampling_params=SAMPLING)
            out[name] = (first, again, engine.dkv_stats())
        finally:
            engine.shutdown()
    return out


def test_the_cache_evicts_under_pressure_and_outputs_stay_the_same(evicting):
    first, again, stats = evicting["cached"]
    ref_first, ref_again, _ = evicting["uncached"]
    assert [o["output_ids"] for o in first] == [o["output_ids"] for o in ref_first]
    assert [o["output_ids"] for o in again] == [o["output_ids"] for o in ref_again]
    assert stats["pool_rows_cached"] < 10 * 330 * TINY_LAYERS, "not every prompt fits: some were evicted"
    assert any(o["meta_info"]["cached_tokens"] > 0 for o in again), "the most recent prompts were still cached"
    assert stats["pool_rows_free"] + stats["pool_rows_cached"] == stats["pool_rows_total"]


POOL, PROMPT = 4000, 1000


@pytest.fixture(scope="module")
def crowded(tiny_model):
    """36 distinct 1,000-token prompts at once into a 4,000-token pool with the cache on: every
    prompt passes through the cache whole, then its request keeps only its rows, so all 36 can
    run at once (rows: (4,000 - 1,000) / (32 + 24) = 53 requests)."""
    import dkv_sglang

    rng = random.Random(5)
    prompts = [[rng.randrange(100, 40000) for _ in range(PROMPT)] for _ in range(36)]
    engine = dkv_sglang.Engine(model_path=tiny_model, kv_policy="dynamickv", kv_budget=BUDGET,
                               **{**ENGINE_ARGS, "max_total_tokens": POOL})
    try:
        outs = engine.generate(input_ids=prompts, sampling_params=SAMPLING)
        return prompts, outs, engine.dkv_stats()
    finally:
        engine.shutdown()


def test_every_long_prompt_is_compressed_when_many_run_in_a_small_pool(crowded):
    """A compressed request holds token ids only for the tokens it keeps somewhere (the rest
    read as the shared hole id): with ids for whole prompts, the running requests and the cache
    ran out of ids (8 per token of the pool) long before rows, and requests stayed uncompressed."""
    prompts, outs, stats = crowded
    assert all(len(o["output_ids"]) == SAMPLING["max_new_tokens"] for o in outs)
    assert all(o["meta_info"].get("kv_kept_per_layer") for o in outs), "a request stayed uncompressed"
    assert stats["requests_compressed"] == len(prompts)
    assert [sum(r["kept_per_layer"]) for r in stats["recent"]] == [BUDGET * TINY_LAYERS] * len(prompts)
    assert stats["peak_running_requests"] > 8 * POOL // PROMPT, "more ran at once than ids for whole prompts allow"
    assert stats["pool_rows_free"] + stats["pool_rows_cached"] == stats["pool_rows_total"]
