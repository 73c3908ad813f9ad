"""The quality benchmark's tables: macro-averaged accuracy, percent of full, targets, CLI presets."""

from __future__ import annotations

import pytest

from bench import quality, summary


def r(task, policy, budget, correct, length=1000, depth=None, kept=None, prompt_tokens=1000):
    return {"task": task, "policy": policy, "budget": budget, "correct": correct, "length": length,
            "depth": depth, "kept_per_layer": kept, "prompt_tokens": prompt_tokens, "answer_first": False}


RESULTS = [
    # full KV: niah 2/2, spread 1/2 -> average 75%
    r("niah", "full", None, True, depth=0.5), r("niah", "full", None, True, depth=0.25),
    r("spread", "full", None, True), r("spread", "full", None, False),
    # dynamickv@128: niah 1/2, spread 1/2 -> 50%
    r("niah", "dynamickv", 128, True, depth=0.5, kept=[200, 56]),
    r("niah", "dynamickv", 128, False, depth=0.25, kept=[100, 156]),
    r("spread", "dynamickv", 128, True, kept=[64, 192]), r("spread", "dynamickv", 128, False, kept=[64, 192]),
    # snapkv@128: niah 1/2, spread 0/2 -> 25%; streamingllm@128: 0
    r("niah", "snapkv", 128, True, depth=0.5), r("niah", "snapkv", 128, False, depth=0.25),
    r("spread", "snapkv", 128, False), r("spread", "snapkv", 128, False),
    r("niah", "streamingllm", 128, False, depth=0.5), r("spread", "streamingllm", 128, False),
]


def test_average_is_over_tasks_and_percent_of_full():
    assert summary.task_accuracy(RESULTS, policy="full") == {"niah": 1.0, "spread": 0.5}
    assert summary.average(RESULTS, policy="full") == 0.75
    assert summary.average(RESULTS, policy="dynamickv", budget=128) == 0.5
    assert summary.percent_of(0.5, 0.75) == pytest.approx(66.67, abs=0.01)
    assert summary.percent_of(0.5, 0.0) is None and summary.percent_of(None, 0.5) is None
    assert summary.average(RESULTS, policy="pyramidkv", budget=128) is None


def test_markdown_table_cells():
    md = summary.markdown(RESULTS, ["full", "dynamickv", "snapkv"], [128])
    assert "Full KV: 75%" in md
    assert "| dynamickv | 50% (67% of full) |" in md
    assert "| snapkv | 25% (33% of full) |" in md
    assert "| spread | 50% | 50% | 0% |" in md


def test_targets_report_what_held():
    (order, long) = summary.targets(RESULTS, [128, 512], long_length=1000)
    assert order["held"] and order["measured"] == "50% / 25% / 0%"
    assert not long["held"] and long["measured"].startswith("67%")


def test_niah_grid_and_layer_budget_shapes():
    assert summary.niah_grid(RESULTS, "dynamickv", 128) == {(1000, 0.25): 0.0, (1000, 0.5): 1.0}
    shape = summary.mean_layer_budget(RESULTS, "dynamickv", 128)
    assert shape == {"niah": [150 / 128, 106 / 128], "spread": [0.5, 1.5]}


def test_checks_name_streamingllm_and_uninformative_tasks():
    text = "\n".join(summary.checks(RESULTS))
    assert "full KV on spread: 50%: UNINFORMATIVE" in text and "full KV on niah: 100%: usable" in text
    assert "streamingllm on mid-context needles (depth 20-80%): 0 of 1 correct" in text


def test_quick_preset_and_requests():
    args = quality.parse(["--quick"])
    assert args.model == "smollm2" and args.tasks == ("niah",) and args.name == "quality-quick-smollm2"
    assert args.budgets == [32, 64, 128, 256, 512] and args.lengths == quality.PRESETS["quick"]["lengths"]
    cases = ["a", "b"]
    reqs = quality.requests_for(cases, ["dynamickv", "snapkv"], [32, 64])
    assert len(reqs) == 2 * (1 + 2 * 2) and reqs[0] == ("a", "full", None)
    assert quality.custom_params("full", None) == {"kv_policy": "full"}
    assert quality.custom_params("snapkv", 64) == {"kv_policy": "snapkv", "kv_budget": 64}
