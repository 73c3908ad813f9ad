"""bench.ruler's pure parts: passes, request bodies, lm-eval samples -> results, essay tasks.
lm-eval itself is a benchmark-only requirement: the tests that need it skip without it."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from bench import ruler, summary
from dkv_sglang.policy import PolicyConfig


def test_passes_put_full_kv_first_then_every_policy_and_budget():
    passes = ruler.configs(["dynamickv", "snapkv"], [32, 64])
    assert passes[0] == ("full", None) and len(passes) == 1 + 2 * 2 and len(set(passes)) == len(passes)


def test_request_body_carries_the_policy_greedy():
    assert ruler.gen_kwargs("full", None) == {"custom_params": {"kv_policy": "full"}, "temperature": 0.0,
                                              "do_sample": False}
    body = ruler.gen_kwargs("snapkv", 64, max_gen_toks=32)
    assert body["custom_params"] == {"kv_policy": "snapkv", "kv_budget": 64} and body["max_gen_toks"] == 32


def test_logged_samples_become_paired_results():
    def sample(doc_id, score):
        return {"doc_id": doc_id, "doc": {"max_length": 4096, "outputs": ["123"]}, "4096": score, "8192": -1.0,
                "filtered_resps": ["is 123"]}

    full = ruler.rows({"niah_single_1": [sample(0, 1.0), sample(1, 1.0)]}, "full", None)
    dyn = ruler.rows({"niah_single_1": [sample(0, 1.0), sample(1, 0.0)]}, "dynamickv", 64)
    snap = ruler.rows({"niah_single_1": [sample(0, 0.0), sample(1, 0.0)]}, "snapkv", 64)
    assert [r["case"] for r in dyn] == ["niah_single_1-4096-0", "niah_single_1-4096-1"]
    res = full + dyn + snap
    assert summary.average(res, policy="dynamickv", budget=64) == 0.5
    t = summary.paired(res, "dynamickv", "snapkv", 64)
    assert (t.n, t.first_only, t.second_only) == (2, 1, 0)


def test_presets():
    quick = ruler.parse(["--quick"])
    assert quick.limit <= 10 and quick.lengths == (4096,) and quick.name == "ruler-quick-smollm2"
    assert ruler.parse(["--standard"]).limit >= 100
    assert set(ruler.PRESETS["full"]["tasks"]) == set(ruler.TASKS)


def test_first_prompt_asks_a_held_out_range_in_pool_sized_groups():
    first = ruler.chunks(0, 15, pool_tokens=72000, max_length=4096, most=16)
    held_out = ruler.chunks(15, 15, pool_tokens=72000, max_length=4096, most=16)
    assert sum(first, []) == list(range(15)) and sum(held_out, []) == list(range(15, 30))
    assert max(len(g) for g in held_out) == 72000 // (4096 + 512)  # the pool, not the batch, binds here
    assert ruler.parse(["--quick", "--first-prompt", "15"]).first_prompt == 15
    with pytest.raises(SystemExit):
        ruler.parse(["--first-prompt", "-1"])


def test_essay_task_files_match_the_table():
    names = {p.stem.removeprefix("essay_") for p in ruler.TASK_DIR.glob("essay_*.yaml")}
    assert names == set(ruler.ESSAY_TASKS)
    for t in ruler.ESSAY_TASKS:
        text = (ruler.TASK_DIR / f"essay_{t}.yaml").read_text()
        assert f"task: essay_{t}\n" in text and f"essay_data.{t}\n" in text


def test_essay_haystack_is_the_shipped_essays_split_on_whitespace():
    words = ruler.essay_haystack()
    assert len(words) > 100_000 and all(w and not any(c.isspace() for c in w) for w in words[:5000])


def test_essay_arguments_are_lm_evals_own():
    """Each essay task passes generate_samples what lm-eval's own function passes (read from its source)."""
    niah_utils = pytest.importorskip("lm_eval.tasks.ruler.niah_utils")
    for task, kwargs in ruler.ESSAY_TASKS.items():
        src = inspect.getsource(getattr(niah_utils, task))
        assert 'type_haystack="essay"' in src
        for key, value in kwargs.items():
            want = f'{key}="{value}"' if isinstance(value, str) else f"{key}={value}"
            assert want in src, (task, want)
        for key in ("num_needle_k", "num_needle_v", "num_needle_q"):
            assert (key in src) == (key in kwargs), (task, key)


def test_prompts_are_the_same_in_every_run():
    """lm-eval's RULER generator draws from Python's global random: load_tasks seeds it, so
    whatever ran before, the same request for prompts gives the same prompts. (lm-eval, nltk and
    wonderwords are benchmark-only, runtime/requirements-bench.txt: skipped where they are not.)"""
    import random

    from runtime.prepare_model import prepare

    for module in ("lm_eval.tasks.ruler.prepare_niah", "nltk", "wonderwords"):
        pytest.importorskip(module)

    ruler.ensure_punkt()

    def answers():
        random.random()  # what ran before must not matter
        ((_, task),) = ruler.load_tasks(["niah_single_1"], [1024], prepare("smollm2"), 3)["tasks"].items()
        return [doc["outputs"] for doc in list(task.eval_docs)[:3]]

    first = answers()
    random.seed(12345)
    assert answers() == first and len(first) == 3


def test_the_servers_dtype_is_bfloat16_unless_asked():
    def dtype(argv):
        args = ruler.parse(argv)
        served = ruler.serve_args(Path("m"), 1000, args.dtype)
        return served[served.index("--dtype") + 1]

    assert dtype(["--quick"]) == "bfloat16"
    assert dtype(["--quick", "--dtype", "float32"]) == "float32"
    assert ruler.parse(["--quick"]).default_allocation == PolicyConfig.allocation, "recorded: what dynamickv meant"
