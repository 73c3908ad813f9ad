import pytest

from bench.client import Result
from bench.metrics import concurrency_bound, percentile, summarize


def test_percentile_interpolates_between_ranks():
    assert percentile([], 99) == 0.0
    assert percentile([5.0], 99) == 5.0
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([0.0, 10.0], 99) == pytest.approx(9.9)


def test_summary_counts_only_complete_requests():
    ok = Result(prompt_tokens=100, ok=True, output_tokens=10, ttft=0.5, latency=1.5, itls=[0.1] * 9)
    slow = Result(prompt_tokens=300, ok=True, output_tokens=10, ttft=1.5, latency=3.0, itls=[0.3] * 9)
    bad = Result(prompt_tokens=200, error="HTTP 400: nope")
    s = summarize([ok, slow, bad], duration=4.0, peak_running=2)
    assert s["failed"] == 1 and s["errors"] == ["HTTP 400: nope"]
    assert s["requests_per_s"] == 0.5
    assert s["output_tokens_per_s"] == 5.0
    assert s["total_tokens_per_s"] == (400 + 20) / 4.0
    assert s["ttft_mean_s"] == 1.0
    assert s["itl_mean_s"] == pytest.approx(0.2)
    assert s["peak_running"] == 2


def test_concurrency_bound():
    # 2600-token prompts, 128 output tokens, budget 128: (2600+128)/(128+128)
    assert concurrency_bound(2600, 128, 128) == pytest.approx(2728 / 256)
    assert concurrency_bound(100, 28, 128) == 1.0  # short prompts are not compressed
