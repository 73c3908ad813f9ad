"""The real SGLang engine on a tiny random Llama: equivalence, exact memory accounting, batching."""

from __future__ import annotations

import pytest

from .conftest import PROMPT_LENGTHS, TINY_LAYERS, run_engine

pytestmark = pytest.mark.engine

SMALL = 32  # budget well below every prompt but the last (60 tokens)


@pytest.fixture(scope="module")
def vanilla(tiny_model, prompts):
    return run_engine(tiny_model, prompts, vanilla=True)


@pytest.fixture(scope="module")
def full(tiny_model, prompts):
    return run_engine(tiny_model, prompts, kv_policy="full")


@pytest.fixture(scope="module")
def dkv_large(tiny_model, prompts):
    return run_engine(tiny_model, prompts, kv_policy="dynamickv", kv_budget=max(PROMPT_LENGTHS))


@pytest.fixture(scope="module")
def dkv_small(tiny_model, prompts):
    return run_engine(tiny_model, prompts, kv_policy="dynamickv", kv_budget=SMALL)


def test_full_policy_is_vanilla_sglang(vanilla, full):
    assert full["batched"] == vanilla["batched"]
    assert full["alone"] == vanilla["alone"]
    assert len(set(vanilla["batched"][0])) > 5, "outputs vary, so equality means something"


def test_a_shut_down_engine_leaves_no_settings_behind(dkv_small):
    """A dkv Engine publishes its settings for the processes it spawns and takes them back at
    shutdown: a plain sglang.Engine made later in this process is vanilla SGLang."""
    import os

    from dkv_sglang.integration import settings

    assert settings.ENV_VAR not in os.environ and settings.PAGE_SIZE_VAR not in os.environ


def test_dynamickv_with_budget_over_prompt_equals_full(full, dkv_large):
    assert dkv_large["batched"] == full["batched"]
    assert dkv_large["alone"] == full["alone"]
    assert dkv_large["stats"]["requests_compressed"] == 0


def test_small_budget_compresses_each_long_prompt_exactly(dkv_small, full):
    stats = dkv_small["stats"]
    L = TINY_LAYERS
    assert stats["num_layers"] == L and stats["policy"] == "dynamickv" and stats["budget"] == SMALL
    long_prompts = [n for n in PROMPT_LENGTHS if n > SMALL]
    recent = stats["recent"]
    assert stats["requests_compressed"] == 2 * len(long_prompts)  # batched, then alone
    assert sorted(r["prompt_tokens"] for r in recent) == sorted(long_prompts * 2)
    for r in recent:
        kept = r["kept_per_layer"]
        assert len(kept) == L and all(8 <= k <= r["prompt_tokens"] for k in kept)  # window 8 always kept
        assert sum(kept) == SMALL * L  # within 1% required; ours is exact
        assert r["rows_freed"] == r["prompt_tokens"] * L - sum(kept)
    # idle again: every row is back (SGLang's strict idle check also ran and passed)
    assert stats["pool_rows_free"] + stats["pool_rows_cached"] == stats["pool_rows_total"]
    assert stats["kept_index_entries"] == 0, "every finished request's kept-row entry is free"
    # compression acted: some continuation differs from full KV
    assert dkv_small["alone"] != full["alone"]


def test_batched_requests_get_their_own_budgets(dkv_small):
    assert dkv_small["batched"] == dkv_small["alone"]
    batched = {r["prompt_tokens"]: r["kept_per_layer"] for r in dkv_small["stats_batched"]["recent"]}
    alone = {r["prompt_tokens"]: r["kept_per_layer"] for r in dkv_small["stats"]["recent"][len(batched):]}
    assert batched == alone
    assert len({tuple(v) for v in batched.values()}) == len(batched), "each request its own shape"


@pytest.fixture(scope="module", params=["snapkv", "pyramidkv", "streamingllm"])
def baseline_small(request, tiny_model, prompts):
    return request.param, run_engine(tiny_model, prompts, kv_policy=request.param, kv_budget=SMALL)


def test_baselines_serve_with_exact_accounting_and_batching(baseline_small, full):
    policy, run = baseline_small
    stats = run["stats"]
    L = TINY_LAYERS
    assert stats["policy"] == policy
    for r in stats["recent"]:
        assert sum(r["kept_per_layer"]) == SMALL * L
        assert r["rows_freed"] == r["prompt_tokens"] * L - SMALL * L
    if policy != "pyramidkv":
        assert all(r["kept_per_layer"] == [SMALL] * L for r in stats["recent"]), "uniform budgets"
    else:
        assert all(r["kept_per_layer"] == sorted(r["kept_per_layer"], reverse=True) for r in stats["recent"])
    assert stats["pool_rows_free"] + stats["pool_rows_cached"] == stats["pool_rows_total"]
    assert run["batched"] == run["alone"]
    assert run["alone"] != full["alone"]


@pytest.fixture(scope="module", params=["dynamickv", "snapkv"])
def adaptive_small(request, tiny_model, prompts):
    return request.param, run_engine(tiny_model, prompts, kv_policy=request.param, kv_budget=SMALL,
                                     kv_head_budgets="adaptive")


def test_adaptive_head_budgets_hold_unequal_heads_in_memory(adaptive_small, full):
    """Ada-KV's head budgets: each (layer, KV head) keeps its own number of rows, the rest is
    freed, the request's total is unchanged, and batching does not change what anyone keeps."""
    policy, run = adaptive_small
    stats = run["stats"]
    L, H = TINY_LAYERS, stats["kv_heads"]
    assert stats["config"]["head_budgets"] == "adaptive" and H > 1
    for r in stats["recent"]:
        per_head = r["kv_kept_per_head"]
        assert len(per_head) == L and all(len(layer) == H for layer in per_head)
        assert [sum(layer) for layer in per_head] == [H * k for k in r["kept_per_layer"]]
        assert sum(r["kept_per_layer"]) == SMALL * L
        assert r["rows_freed"] == r["prompt_tokens"] * L - SMALL * L  # counted from the row table
    assert any(len(set(layer)) > 1 for r in stats["recent"] for layer in r["kv_kept_per_head"]), "heads differ"
    assert stats["pool_rows_free"] + stats["pool_rows_cached"] == stats["pool_rows_total"]
    assert run["batched"] == run["alone"]
    batched = {r["prompt_tokens"]: r["kv_kept_per_head"] for r in run["stats_batched"]["recent"]}
    alone = {r["prompt_tokens"]: r["kv_kept_per_head"] for r in stats["recent"][len(batched):]}
    assert batched == alone
    assert run["alone"] != full["alone"]


# One batch, four requests, each with its own policy through custom_params.
OVERRIDES = [{"kv_policy": "full"}, {}, {"kv_policy": "snapkv", "kv_budget": 48}, {"kv_budget": 16}]


@pytest.fixture(scope="module")
def per_request(tiny_model, prompts):
    import dkv_sglang

    from .conftest import ENGINE_ARGS, SAMPLING

    engine = dkv_sglang.Engine(model_path=tiny_model, kv_policy="dynamickv", kv_budget=SMALL, **ENGINE_ARGS)
    try:
        params = [{**SAMPLING, "custom_params": o} for o in OVERRIDES]
        outputs = engine.generate(input_ids=prompts, sampling_params=params)
        stats = engine.dkv_stats()
        large = {
            policy: [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params={
                **SAMPLING, "custom_params": {"kv_policy": policy, "kv_budget": max(PROMPT_LENGTHS)}})]
            for policy in ("snapkv", "pyramidkv", "streamingllm")
        }
        with pytest.raises(ValueError, match="custom_params.kv_budget"):
            engine.generate(input_ids=prompts[0], sampling_params={**SAMPLING, "custom_params": {"kv_budget": 0}})
        metas = [o["meta_info"] for o in outputs]
        return [o["output_ids"] for o in outputs], [m["id"] for m in metas], stats, large, metas
    finally:
        engine.shutdown()


def test_each_request_runs_its_own_policy_in_one_batch(per_request, full, dkv_small):
    outputs, rids, stats, _, _ = per_request
    kept = {r["rid"]: r["kept_per_layer"] for r in stats["recent"]}
    L = TINY_LAYERS
    assert rids[0] not in kept and outputs[0] == full["alone"][0]  # full: nothing dropped
    assert outputs[1] == dkv_small["alone"][1]  # the server's default
    assert sum(kept[rids[1]]) == SMALL * L
    assert kept[rids[2]] == [48] * L  # snapkv: uniform
    assert sum(kept[rids[3]]) == 16 * L and len(set(kept[rids[3]])) > 1  # dynamickv at 16
    assert stats["pool_rows_free"] + stats["pool_rows_cached"] == stats["pool_rows_total"]


def test_every_policy_with_budget_over_prompt_equals_full(per_request, full):
    for policy, outputs in per_request[3].items():
        assert outputs == full["batched"], policy


def test_each_response_reports_what_was_kept_for_it(per_request):
    _, rids, stats, _, metas = per_request
    kept = {r["rid"]: r["kept_per_layer"] for r in stats["recent"]}
    assert "kv_kept_per_layer" not in metas[0]  # kept whole
    for rid, meta, n in zip(rids[1:], metas[1:], PROMPT_LENGTHS[1:]):
        assert meta["kv_kept_per_layer"] == kept[rid]
        assert meta["kv_prompt_tokens"] == n
