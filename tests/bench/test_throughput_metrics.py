"""What bench/serving.py adds to SGLang's bench_serving: the decode step while every request of
a batch decodes, the concurrency bound, and the command line it runs."""

from pathlib import Path

import pytest

from bench.serving import Load, command, concurrency_bound, decode_step_ms


def test_decode_step_counts_only_gaps_while_every_request_decodes():
    # request 0 starts decoding at 1.0 s, request 1 at 2.0 s (its prefill held everyone up);
    # request 0 finishes at 1.0 + 0.5 + 1.5 + 0.1 + 0.1 = 3.2 s, request 1 at 2.0 + 4 * 0.1 = 2.4 s
    ttfts = [1.0, 2.0]
    itls = [[0.5, 1.5, 0.1, 0.1], [0.1, 0.1, 0.1, 0.1]]
    # window [2.0, 2.4]: request 0's gap ending at 3.0 started at 1.5 (before 2.0): excluded;
    # request 1's four 0.1 s gaps all lie inside
    assert decode_step_ms(ttfts, itls) == pytest.approx(100.0)
    assert decode_step_ms([1.0], [[0.2, 0.4, 0.3]]) == pytest.approx(300.0)
    assert decode_step_ms([], []) is None
    assert decode_step_ms([1.0, 5.0], [[0.1], [0.1]]) is None, "never all decoding at once"


def test_concurrency_bound():
    # 2600-token prompts, 128 output tokens, budget 128: (2600+128)/(128+128)
    assert concurrency_bound(2600, 128, 128) == pytest.approx(2728 / 256)
    assert concurrency_bound(100, 28, 128) == 1.0  # short prompts are not compressed


def test_command_is_sglangs_bench_serving_on_random_ids_with_the_budget_in_custom_labels():
    cmd = command("http://h:1", "m", Load(12, 3200, 0.625, 128, seed=3), Path("o.jsonl"),
                  {"custom_labels": {"kv_budget": "64"}})
    assert cmd[1:3] == ["-m", "sglang.benchmark.serving"]
    args = dict(zip(cmd[3::1], cmd[4::1]))
    assert args["--dataset-name"] == "random-ids" and args["--num-prompts"] == "12"
    assert args["--random-input-len"] == "3200" and args["--random-range-ratio"] == "0.625"
    assert args["--request-rate"] == "inf" and args["--seed"] == "3"
    assert "--flush-cache" in cmd and "--tokenize-prompt" in cmd and "--output-details" in cmd
    assert args["--extra-request-body"] == '{"custom_labels": {"kv_budget": "64"}}'


def test_decode_targets_are_ratios_of_the_cells_that_exist():
    from bench.throughput import decode_targets

    cells = {"dynamickv/8000/1": 66.0, "dynamickv/1000/1": 60.0, "dynamickv/4000/1": 70.0, "full/256/1": 62.0,
             "dynamickv/4000/8": 140.0, "full/4000/8": 1000.0, "dynamickv/8000/8": None}
    res = {"budget": 128, "cells": {k: {"decode_step_ms": v} for k, v in cells.items()}}
    got = {t["target"]: (t["value"], t["pass"]) for t in decode_targets(res)}
    assert got == {
        "dynamickv-128, 8k / 1k-token prompts, batch 1 <= 1.1x": (1.1, True),
        "dynamickv-128 at 4k / full KV at 256-token prompts, batch 1 <= 1.05x": (1.129, False),
        "dynamickv-128 / full KV, 4k-token prompts, batch 8 <= 0.14x": (0.14, True),
    }  # batch 8 at 8k has no step (never all decoding at once): no row rather than a made-up one


def test_decode_table_with_adaptive_heads_adds_a_column_a_ratio_and_its_target():
    from bench.throughput import decode_markdown, decode_targets, server_args

    labels = ("full", "dynamickv", "dynamickv+adaptive")
    ms = {"full": 100.0, "dynamickv": 20.0, "dynamickv+adaptive": 25.0}
    cells = {f"{label}/4000/{b}": {"decode_step_ms": ms[label] * b / 8} for label in labels for b in (8, 32)}
    res = {"model": "m", "dtype": "float32", "budget": 128, "labels": labels, "cells": cells}
    got = {t["target"]: (t["value"], t["pass"]) for t in decode_targets(res)}
    assert got["dynamickv-128 adaptive / uniform head budgets, 4k-token prompts, batch 32 <= 1.15x"] == (1.25, False)
    res["targets"] = decode_targets(res)
    table = decode_markdown(res, [4000], [8, 32])
    assert "| full | dynamickv | dynamickv+adaptive | dynamickv / full | dynamickv+adaptive / dynamickv |" in table
    assert "| 4000 | 8 | 100.0 | 20.0 | 25.0 | 0.20x | 1.25x |" in table
    # without the third server: the two-column table of before, and no adaptive target
    two = {k: v for k, v in cells.items() if not k.startswith("dynamickv+adaptive")}
    plain = {"model": "m", "dtype": "float32", "budget": 128, "cells": two}
    assert "| 4000 | 32 | 400.0 | 80.0 | 0.20x |" in decode_markdown(plain, [4000], [8, 32])
    assert not [t for t in decode_targets(plain) if "adaptive" in t["target"]]
    assert "No target was checked" not in table
    # cells at lengths no target reads (4096, not 4000): the table says no target was checked
    odd = {k.replace("/4000/", "/4096/"): v for k, v in cells.items()}
    res_odd = {**res, "cells": odd}
    res_odd["targets"] = decode_targets(res_odd)
    assert res_odd["targets"] == [] and "No target was checked" in decode_markdown(res_odd, [4096], [8, 32])
    args = server_args("m", "float32", "dynamickv", 128, None, True, head_budgets="adaptive")
    assert args[args.index("--kv-head-budgets") + 1] == "adaptive"
    assert "--kv-head-budgets" not in server_args("m", "float32", "dynamickv", 128, None, True)


def test_adaptive_heads_flag_needs_the_decode_table(capsys):
    from bench.throughput import main

    with pytest.raises(SystemExit) as e:
        main(["--adaptive-heads"])
    assert e.value.code == 2 and "--adaptive-heads" in capsys.readouterr().err


def _row(tok_s: float, peak: int = 4) -> dict:
    return {"request_throughput": 0.1, "output_throughput": tok_s, "total_throughput": 10 * tok_s,
            "mean_ttft_ms": 1000.0, "p99_ttft_ms": 2000.0, "median_itl_ms": 50.0, "p99_itl_ms": 90.0,
            "peak_running": peak, "kv_tokens_per_request": 200.0, "retracted": 0, "failed": 0}


def test_dynamickv_overlap_off_row_sits_beside_the_defaults_with_its_target():
    from bench.throughput import check_targets, markdown, named_rows

    defaults = {"full_small_pool": _row(30.0, 2), "dynamickv_small_pool": {"64": _row(90.0, 30)},
                "full_large_pool": _row(60.0, 48), "dynamickv_large_pool": _row(84.0, 48)}
    res = {"preset": "quick", "model": "m", "main_budget": 64, "small_pool_tokens": 1, "large_pool_tokens": 2,
           "load": {"num_prompts": 48, "input_len": 3200, "range_ratio": 0.625, "output_len": 128},
           "concurrency_bound": 10.0, "defaults": defaults,
           "no_overlap": {"full_small_pool": _row(25.0, 2), "dynamickv_large_pool": _row(70.0, 48)},
           "no_radix_cache": {"full_small_pool": _row(30.0, 2), "dynamickv_small_pool": {"64": _row(90.0, 30)}}}
    names = [name for name, _ in named_rows(res)]
    assert "dynamickv-64, large pool, --disable-overlap-schedule" in names
    assert "full, small pool, --disable-overlap-schedule" in names
    got = {t["target"]: (t["value"], t["pass"]) for t in check_targets(res)}
    assert got["dynamickv-64 overlap on / off output tok/s, pool that fits every request >= 1.1x"] == (1.2, True)
    assert got["dynamickv-64 / full output tok/s, pool that fits every request, defaults >= 1.3x"] == (1.4, True)
    assert got["dynamickv-64 / full output tok/s, pool that fits every request, defaults >= 1.8x"] == (1.4, False)
    assert got["dynamickv-64 / full output tok/s, same small pool, defaults >= 2.9x"] == (3.0, True)
    assert got["no failed request"] == (0, True)
    res["targets"] = check_targets(res)
    text = markdown(res)
    assert ("DynamicKV-64, pool that fits every request, output tok/s with overlap scheduling on (default) / off: "
            "1.20x.") in text
    assert "| dynamickv-64, large pool, --disable-overlap-schedule | 0.100 | 70.0 |" in text
