"""``python -m dkv_sglang.stats``'s sums and the data-parallel ``combine`` (no server)."""

from dkv_sglang.stats import combine, render, summary


def _stats(compressed, free, cached, running=0, peak=1, kept=(10, 20)):
    return {"policy": "dynamickv", "budget": 15, "num_layers": 2, "running_requests": running,
            "peak_running_requests": peak, "retracted_requests": 0, "requests_compressed": compressed,
            "pool_rows_total": 1000, "pool_rows_free": free, "pool_rows_cached": cached, "token_ids_free": 50,
            "recent": [{"rid": f"r{compressed}", "prompt_tokens": 100, "kept_per_layer": list(kept)}]}


def test_one_rank_is_left_as_it_is():
    one = _stats(3, 900, 100)
    assert combine([one]) is one


def test_ranks_are_summed_and_listed():
    a, b = _stats(3, 900, 100, peak=4), _stats(5, 800, 50, running=2, peak=2)
    out = combine([a, b])
    assert (out["requests_compressed"], out["pool_rows_total"], out["pool_rows_free"]) == (8, 2000, 1700)
    assert (out["pool_rows_cached"], out["running_requests"], out["token_ids_free"]) == (150, 2, 100)
    assert out["peak_running_requests"] == 4 and len(out["recent"]) == 2
    assert [r["requests_compressed"] for r in out["dp_ranks"]] == [3, 5]
    assert "recent" not in out["dp_ranks"][0] and a["requests_compressed"] == 3  # inputs untouched


def test_summary_sums_up_workers_and_counts_the_down():
    view = summary({"http://a": _stats(3, 900, 100), "http://b": _stats(5, 800, 50, running=2), "http://c": None})
    t = view["total"]
    assert (view["workers_up"], view["workers_down"]) == (2, 1)
    assert (t["requests_compressed"], t["running_requests"], t["pool_rows_used"]) == (8, 2, 150)
    assert t["kept_rows_per_request"] == 30 and t["retention"] == 0.15  # 30 of 2 layers x 100 tokens
    assert view["workers"]["http://c"] is None and view["workers"]["http://b"]["pool_rows_used"] == 150
    table = render(view)
    [down] = [line for line in table.splitlines() if line.startswith("http://c")]
    assert down.split() == ["http://c", "DOWN"] and "total (2 up)" in table
