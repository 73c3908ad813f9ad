"""Retraction under memory pressure: a compressed request that SGLang retracts frees all it
holds, and when re-admitted it is prefilled again, cut to the rows it chose the first time,
and continues with the same greedy tokens as if it had never been retracted."""

from __future__ import annotations

import os
import random

import pytest

from .conftest import ENGINE_ARGS, TINY_LAYERS

pytestmark = pytest.mark.engine

BUDGET = 32
PROMPTS = 6
PROMPT_LEN = 300
# Not ignore_eos: SGLang then reserves every running request's whole remaining output.
SAMPLING = {"max_new_tokens": 400, "temperature": 0}


def _run(model, prompts, max_total_tokens, head_budgets):
    import dkv_sglang

    args = {**ENGINE_ARGS, "max_total_tokens": max_total_tokens, "kv_head_budgets": head_budgets}
    # SGLang admits assuming each running request will need this share of its remaining
    # tokens; a low guess over-admits, so decode runs out of rows and must retract.
    os.environ["SGLANG_INIT_NEW_TOKEN_RATIO"] = "0.05"
    try:
        engine = dkv_sglang.Engine(model_path=model, kv_policy="dynamickv", kv_budget=BUDGET, **args)
    finally:
        del os.environ["SGLANG_INIT_NEW_TOKEN_RATIO"]
    try:
        outputs = engine.generate(input_ids=prompts, sampling_params=SAMPLING)
        return [o["output_ids"] for o in outputs], [o["meta_info"]["id"] for o in outputs], engine.dkv_stats()
    finally:
        engine.shutdown()


@pytest.fixture(scope="module", params=["uniform", "adaptive"])
def runs(request, tiny_model):
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 40000) for _ in range(PROMPT_LEN)] for _ in range(PROMPTS)]
    # Every request ends holding BUDGET + 400 tokens' rows: 6 of them need ~2600 tokens, more
    # than the small pool, which admits them all once compressed and must retract later.
    # With adaptive head budgets each (layer, head) keeps its own count, and a replay must too.
    small = _run(tiny_model, prompts, max_total_tokens=1100, head_budgets=request.param)
    roomy = _run(tiny_model, prompts, max_total_tokens=16384, head_budgets=request.param)
    return small, roomy


def test_retracted_requests_continue_as_if_never_retracted(runs):
    (out_small, _, stats_small), (out_roomy, _, stats_roomy) = runs
    assert stats_small["retracted_requests"] > 0, "the small pool forced retraction"
    assert stats_roomy["retracted_requests"] == 0
    replayed = [r for r in stats_small["recent"] if r["replayed"]]
    assert replayed, "a retracted compressed request was cut again on re-admission"
    assert out_small == out_roomy
    assert all(len(o) == SAMPLING["max_new_tokens"] for o in out_small), "no request was cut short"
    # compressed requests are admitted on their compressed footprint: all six ran at once
    assert stats_small["peak_running_requests"] == PROMPTS


def test_replays_keep_the_first_selection_and_nothing_leaks(runs):
    (_, rids, stats), (_, rids_roomy, stats_roomy) = runs
    first = {}
    for r in stats["recent"]:
        first.setdefault(r["rid"], r["kv_kept_per_head"])
        assert r["kv_kept_per_head"] == first[r["rid"]]
        assert sum(r["kept_per_layer"]) == BUDGET * TINY_LAYERS
    roomy = {r["rid"]: r["kv_kept_per_head"] for r in stats_roomy["recent"]}
    assert [first[r] for r in rids] == [roomy[r] for r in rids_roomy]
    assert stats["pool_rows_free"] + stats["pool_rows_cached"] == stats["pool_rows_total"]
