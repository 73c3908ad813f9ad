"""The quality benchmark's tables: macro-averaged accuracy, percent of full, targets, CLI presets."""

from __future__ import annotations

import pytest

from bench import quality, summary


_N = iter(range(10**6))


def r(task, policy, budget, correct, length=1000, depth=None, kept=None, prompt_tokens=1000, case=None, score=None):
    case = case or f"{task}-{depth}-{next(_N) // 4}"
    return {"case": case, "task": task, "policy": policy, "budget": budget, "correct": correct, "length": length,
            "depth": depth, "kept_per_layer": kept, "prompt_tokens": prompt_tokens, "answer_first": False,
            "score": score}


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


def test_markdown_tables_carry_counts_intervals_and_percent_of_full():
    md = summary.markdown(RESULTS, ["full", "dynamickv", "snapkv"], [128])
    assert "prompts per (task, policy, budget) cell: 2" in md and "niah (2), spread (2)" in md
    assert "| dynamickv | 50 [" in md and "(67% of full) |" in md
    assert "**spread** (2 prompts per cell; full KV 50 [9, 91])" in md  # Wilson 1 of 2
    assert "| snapkv | 0 [0, 66] |" in md  # spread: Wilson 0 of 2
    assert "dynamickv vs snapkv on the same prompts" in md


def test_targets_report_what_held():
    (order, long) = summary.targets(RESULTS, [128, 512], long_length=1000)
    assert order["held"] and order["measured"].startswith("50.0 vs 25.0 (")
    assert not long["held"] and long["measured"].startswith("67% (")  # no prompt asked both ways: no interval


def test_percent_of_full_interval_is_paired_over_prompts():
    same = [r("niah", p, b, i % 3 > 0, case=f"c{i}") for i in range(30) for p, b in (("full", None), ("dynamickv", 128))]
    assert summary.percent_interval(same, "dynamickv", 128)[:2] == pytest.approx((100, 100))  # a copy: no spread
    half = [x for x in same if x["policy"] == "full"]
    half += [r("niah", "dynamickv", 128, i % 3 > 0 and i % 2 == 0, case=f"c{i}") for i in range(30)]
    lo, hi, n = summary.percent_interval(half, "dynamickv", 128)
    pct = summary.percent_of(summary.average(half, policy="dynamickv", budget=128), summary.average(half, policy="full"))
    assert n == 30 and lo < pct < hi and 20 < lo and hi < 80
    assert summary.percent_interval(half, "snapkv", 128) is None
    (long,) = summary.targets(half, [], long_length=1000)
    assert long["measured"].startswith(f"{pct:.0f}% [{lo:.0f}, {hi:.0f}], 30 prompts (")


def test_paired_test_uses_the_same_prompts():
    res = []
    for i in range(12):  # dynamickv right on 10 prompts snapkv misses, wrong on 1 it gets
        res.append(r("niah", "dynamickv", 64, i < 10, case=f"c{i}"))
        res.append(r("niah", "snapkv", 64, i == 11, case=f"c{i}"))
    t = summary.paired(res, "dynamickv", "snapkv", 64)
    assert (t.n, t.first_only, t.second_only) == (12, 10, 1)
    assert t.p_value == pytest.approx(2 * 12 / 2**11)
    assert "+75 (10:1, p=0.012)" in summary.paired_markdown(res, ["niah"], [64])
    (target,) = summary.targets(res, [64])
    assert target["held"] and "dynamickv better" in target["measured"]
    # a run naming the default's allocation (dynamickv:floor) is held to the same targets
    from bench.presets import default_label
    floor = [{**x, "policy": "dynamickv:floor"} if x["policy"] == "dynamickv" else x for x in res]
    label = default_label(["dynamickv:reference", "dynamickv:floor", "snapkv"], "floor")
    assert label == "dynamickv:floor" and default_label(["dynamickv", "dynamickv:floor"], "floor") == "dynamickv"
    (target,) = summary.targets(floor, [64], policy=label)
    assert target["held"] and target["target"].startswith("dynamickv:floor >= snapkv")
    assert summary.targets(floor, [64]) == []  # no plain dynamickv in these results


def test_graded_scores_use_bootstrap_and_sign_test():
    res = [r("code", "dynamickv", 32, False, case=f"c{i}", score=0.5 + 0.01 * i) for i in range(20)]
    res += [r("code", "snapkv", 32, False, case=f"c{i}", score=0.5) for i in range(20)]
    lo, hi = summary.interval(summary.task_scores(res, policy="dynamickv")["code"])
    assert lo < 0.595 < hi and hi - lo < 0.1
    t = summary.paired(res, "dynamickv", "snapkv", 32)
    assert (t.first_only, t.second_only) == (19, 0) and t.p_value < 1e-4  # c0 ties


def test_average_interval_brackets_the_average():
    per_task = {"a": [1.0] * 8 + [0.0] * 2, "b": [0.0] * 5 + [1.0] * 5}
    lo, hi = summary.average_interval(per_task)
    assert lo < 0.65 < hi and 0.4 < lo and hi < 0.9
    assert summary.average_interval({"a": [0.0] * 3}) == summary.interval([0.0] * 3)  # Wilson, not [0, 0]


def test_niah_grid_and_layer_budget_shapes():
    assert summary.niah_grid(RESULTS, "dynamickv", 128) == {(1000, 0.25): 0.0, (1000, 0.5): 1.0}
    shape = summary.mean_layer_budget(RESULTS, "dynamickv", 128)
    assert shape == {"niah": [150 / 128, 106 / 128], "spread": [0.5, 1.5]}


def test_shapes_over_all_tasks_and_per_head(tmp_path):
    from bench import plots

    assert summary.mean_layer_budget(RESULTS, "dynamickv", 128, by_task=False) == {"all": [107 / 128, 149 / 128]}
    heads = [dict(r("niah", "snapkv+adaptive", 64, True, kept=[64, 64]), kept_per_head=h)
             for h in ([[60, 68], [64, 64]], [[70, 58], [62, 66]])]
    assert summary.mean_head_budget(heads, "snapkv+adaptive", 64) == [[65 / 64, 63 / 64], [63 / 64, 65 / 64]]
    assert summary.mean_head_budget(RESULTS, "dynamickv", 128) == []
    assert plots.head_shapes(heads, [64], ["snapkv+adaptive"], tmp_path / "h.png").stat().st_size > 0
    assert plots.allocation_shapes(RESULTS, [128], ["dynamickv", "snapkv"], tmp_path / "a.png").stat().st_size > 0
    assert plots.allocation_shapes(RESULTS, [128], ["streamingllm"], tmp_path / "b.png") is None  # no kept rows


def test_layer_shapes_name_top_layers_and_task_gap():
    (line,) = summary.layer_shapes(RESULTS, [128, 64])
    assert line.startswith("budget 128: niah: L0 1.2x, L1 0.8x; spread: L1 1.5x, L0 0.5x")
    assert "mean |difference| 0.67x" in line  # (|1.17-0.5| + |0.83-1.5|) / 2


def test_checks_name_streamingllm_and_uninformative_tasks():
    text = "\n".join(summary.checks(RESULTS))
    assert "full KV on spread: 50%: UNINFORMATIVE" in text and "full KV on niah: 100%: usable" in text
    assert "streamingllm on mid-context needles (depth 20-80%): 0 of 1 correct" in text


def test_quick_preset_and_requests():
    args = quality.parse(["--quick"])
    assert args.model == "smollm2" and "followup" in args.tasks and "code" in args.tasks
    assert args.name == "quality-quick-smollm2"
    assert args.budgets == [32, 64, 128, 256] and args.lengths == quality.PRESETS["quick"]["lengths"]
    std = quality.parse(["--standard"])
    assert std.name == "quality-standard-smollm2" and len(std.depths) * std.seeds >= 100
    cases = ["a", "b"]
    reqs = quality.requests_for(cases, ["dynamickv", "snapkv"], [32, 64])
    assert len(reqs) == 2 * (1 + 2 * 2) and reqs[0] == ("a", "full", None)
    # in blocks: every config of cases 0-15 before any request for case 16, full KV first in each
    many = [f"c{i}" for i in range(20)]
    reqs = quality.requests_for(many, ["dynamickv", "snapkv"], [32, 64])
    first = reqs[: 16 * 5]
    assert {c for c, _, _ in first} == set(many[:16]) and all(p == "full" for _, p, _ in first[:16])
    assert reqs[16 * 5] == ("c16", "full", None) and len(reqs) == 20 * 5
    assert quality.custom_params("full", None) == {"kv_policy": "full"}
    assert quality.custom_params("snapkv", 64) == {"kv_policy": "snapkv", "kv_budget": 64}
    assert quality.custom_params("dynamickv:floor", 32) == {"kv_policy": "dynamickv", "kv_allocation": "floor",
                                                            "kv_budget": 32}


def test_reuse_takes_answered_requests_from_earlier_runs(tmp_path, monkeypatch):
    import json
    from types import SimpleNamespace

    cases = [SimpleNamespace(name=n) for n in ("a", "b")]
    reqs = quality.requests_for(cases, ["dynamickv:floor", "snapkv"], [32])
    earlier = [r("niah", "full", None, True, case="a"), r("niah", "snapkv", 32, False, case="a"),
               r("niah", "snapkv", 64, False, case="b")]  # another budget: not one of these requests
    path = tmp_path / "quality-earlier.json"
    path.write_text(json.dumps({"args": {"model": "smollm2"}, "results": earlier}))
    found, todo = quality.split_reused(reqs, [path], "smollm2")
    assert found == earlier[:2]
    assert [(c.name, p, b) for c, p, b in todo] == [("b", "full", None), ("a", "dynamickv:floor", 32),
                                                    ("b", "dynamickv:floor", 32), ("b", "snapkv", 32)]
    with pytest.raises(SystemExit, match="not qwen"):
        quality.split_reused(reqs, [path], "qwen")
    # run with another --kv-window: only full KV's answers hold
    found, todo = quality.split_reused(reqs, [path], "smollm2", window=16)
    assert found == earlier[:1] and len(todo) == 5
    # a plain "dynamickv" is the server's default allocation of each run: "reference" in a file
    # that does not say, so it answers "dynamickv:reference" here, and not "dynamickv" under floor
    old = [r("niah", "dynamickv", 32, True, case="a")]
    path.write_text(json.dumps({"args": {"model": "smollm2"}, "results": old}))
    ref = quality.requests_for(cases[:1], ["dynamickv:reference", "dynamickv"], [32])[1:]
    found, todo = quality.split_reused(ref, [path], "smollm2", allocation="floor")
    assert [f["policy"] for f in found] == ["dynamickv:reference"] and [p for _, p, _ in todo] == ["dynamickv"]
    found, _ = quality.split_reused(ref, [path], "smollm2", allocation="reference")
    assert [f["policy"] for f in found] == ["dynamickv:reference", "dynamickv"]
    path.write_text(json.dumps({"args": {"model": "smollm2"}, "results": earlier}))
    with pytest.raises(SystemExit):  # a budget must exceed the window
        quality.parse(["--quick", "--budgets", "16", "32", "--kv-window", "16"])
    args = quality.parse(["--quick", "--reuse", str(path), "--name", "reuse-test"])
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    json_path, _ = quality.write_tables(args, found, 1.0)  # the args (with --reuse) are saved too
    assert json.loads(json_path.read_text())["args"]["reuse"] == [str(path)]


def test_allocations_are_paired_with_snapkv_and_with_the_reference():
    labels = ["dynamickv:reference", "dynamickv:floor", "snapkv", "pyramidkv"]
    assert summary.pairs(labels) == [("dynamickv:reference", "snapkv"), ("dynamickv:floor", "snapkv"),
                                     ("dynamickv:floor", "dynamickv:reference")]
    assert summary.pairs(["dynamickv", "pyramidkv"]) == []
    assert summary.pairs(["dynamickv", "dynamickv+adaptive", "snapkv+adaptive"]) == [
        ("dynamickv+adaptive", "dynamickv")]
    assert summary.pairs(["snapkv", "snapkv+adaptive", "snapkv+shares", "pyramidkv+shares"]) == [
        ("snapkv+adaptive", "snapkv"), ("snapkv+shares", "snapkv"), ("snapkv+shares", "snapkv+adaptive")]
    assert quality.custom_params("snapkv+shares", 64)["kv_head_budgets"] == "shares"
    assert summary.pairs(["dynamickv", "dynamickv+adaptive", "dynamickv+max", "snapkv+max"]) == [
        ("dynamickv+adaptive", "dynamickv"), ("dynamickv+max", "dynamickv"), ("dynamickv+max", "dynamickv+adaptive")]
    assert summary.pairs(["dynamickv", "dynamickv:floor", "dynamickv:reference"]) == [
        ("dynamickv:floor", "dynamickv"), ("dynamickv:reference", "dynamickv")]
    assert quality.custom_params("snapkv+adaptive", 64) == {"kv_policy": "snapkv", "kv_head_budgets": "adaptive",
                                                            "kv_budget": 64}
    res = [r("niah", p, 64, ok, case=f"c{i}") for i in range(6)
           for p, ok in (("dynamickv:reference", i < 1), ("dynamickv:floor", i < 5), ("snapkv", i < 3))]
    md = summary.markdown(res, ["full", *labels[:3]], [64])
    assert "dynamickv:floor vs dynamickv:reference on the same prompts" in md
    assert "+67 (4:0, p=0.12)" in md and "-33 (0:2, p=0.50)" in md


def test_a_run_answered_entirely_by_reuse_starts_no_engine(tmp_path, monkeypatch):
    import json

    from transformers import AutoTokenizer

    from bench import tasks
    from runtime.prepare_model import prepare

    argv = ["--quick", "--tasks", "niah", "--budgets", "32", "--policies", "snapkv"]
    args = quality.parse(argv)
    cases = tasks.build(AutoTokenizer.from_pretrained(prepare("smollm2")), args.tasks, args.lengths, args.depths,
                        range(args.seeds))
    earlier = [r("niah", p, b, p == "full", case=c.name, depth=c.depth)
               for c, p, b in quality.requests_for(cases, args.policies, args.budgets)]
    path = tmp_path / "quality-earlier.json"
    path.write_text(json.dumps({"args": {"model": "smollm2"}, "results": earlier}))
    monkeypatch.setattr(quality, "start_engine", lambda *a: pytest.fail("an engine started"))
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    assert quality.main([*argv, "--reuse", str(path), "--name", "again"]) == 0
    report = json.loads((tmp_path / "again.json").read_text())
    assert len(report["results"]) == len(earlier) == 4 * 2
    assert "| snapkv | 0 [0, 49] |" in (tmp_path / "again.md").read_text()
    # --first-seed asks only later seeds' prompts: seed 1 of a 2-seed run is its second half
    two = tasks.build(AutoTokenizer.from_pretrained(prepare("smollm2")), args.tasks, args.lengths, args.depths,
                      range(2))
    assert [c.name for c in two[:len(cases)]] == [c.name for c in cases]
    later = [r("niah", p, b, True, case=c.name, depth=c.depth)
             for c, p, b in quality.requests_for(two[len(cases):], args.policies, args.budgets)]
    path.write_text(json.dumps({"args": {"model": "smollm2"}, "results": earlier + later}))
    assert quality.main([*argv, "--first-seed", "1", "--reuse", str(path), "--name", "held-out"]) == 0
    report = json.loads((tmp_path / "held-out.json").read_text())
    assert sorted(x["case"] for x in report["results"]) == sorted(x["case"] for x in later)


def test_compare_pairs_two_runs_prompt_by_prompt(tmp_path):
    import json

    from bench import compare

    # run A (before defaults were recorded: its "dynamickv" is the reference), run B with a wider window
    a = [r("niah", p, 64, ok, case=f"c{i}") for i in range(8) for p, ok in (("dynamickv", i < 2), ("snapkv", i < 4))]
    a.append(r("niah", "snapkv", 64, True, case="only-in-a"))
    b = [r("niah", p, 64, ok, case=f"c{i}") for i in range(8) for p, ok in (("dynamickv:reference", i < 7),
                                                                          ("snapkv", i < 4))]
    paths = []
    for name, results, args in (("a", a, {"model": "smollm2"}),
                                ("b", b, {"model": "smollm2", "default_allocation": "floor"})):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps({"args": args, "results": results}))
    md = compare.compare(*paths)
    # dynamickv:reference: 7/8 vs 2/8 on the same 8 prompts, 5:0 -> p = 1/16; snapkv unchanged
    assert "dynamickv:reference @ b vs dynamickv:reference @ a" in md and "+62 (5:0, p=0.062)" in md
    assert "snapkv @ b vs snapkv @ a" in md and "+0 (0:0, p=1.00)" in md  # "only-in-a" left out
    (tmp_path / "c.json").write_text(json.dumps({"args": {"model": "qwen"}, "results": b}))
    with pytest.raises(SystemExit, match="not the same prompts"):
        compare.compare(paths[0], tmp_path / "c.json")


def test_paired_interval_weighs_how_far_partial_scores_moved():
    # first ahead by 0.9 on 8 prompts, behind by 0.05 on 12: the sign test sees 8:12 (no difference),
    # the task-averaged difference is +0.33 and its paired interval lies above zero
    res = [r("code", "dynamickv", 64, False, case=f"c{i}", score=0.95 if i < 8 else 0.45) for i in range(20)]
    res += [r("code", "snapkv", 64, False, case=f"c{i}", score=0.05 if i < 8 else 0.5) for i in range(20)]
    t = summary.paired(res, "dynamickv", "snapkv", 64)
    assert (t.first_only, t.second_only) == (8, 12) and t.p_value > 0.5
    d, lo, hi = summary.paired_interval(res, "dynamickv", "snapkv", 64)
    assert d == pytest.approx(0.33) and 0 < lo < d < hi
    assert "+33.0 [+" in summary.paired_markdown(res, ["code"], [64])
    # a copy differs by nothing; a budget neither side ran has no interval
    copy = [{**x, "policy": "snapkv"} for x in res if x["policy"] == "dynamickv"]
    assert summary.paired_interval(res[:20] + copy, "dynamickv", "snapkv", 64) == (0, 0, 0)
    assert summary.paired_interval(res, "dynamickv", "snapkv", 128) is None
