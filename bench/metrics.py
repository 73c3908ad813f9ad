"""Serving metrics from per-request results (pure Python: unit-tested without a server)."""

from __future__ import annotations

import math


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between closest ranks; 0.0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(results, duration: float, peak_running: int) -> dict:
    """Throughput and latency of one run of a request stream."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    ttfts = [r.ttft for r in ok]
    itls = [x for r in ok for x in r.itls]
    return {
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "requests_per_s": len(ok) / duration,
        "output_tokens_per_s": out_tokens / duration,
        "total_tokens_per_s": (in_tokens + out_tokens) / duration,
        "ttft_mean_s": sum(ttfts) / len(ttfts) if ttfts else 0.0,
        "ttft_p99_s": percentile(ttfts, 99),
        "itl_mean_s": sum(itls) / len(itls) if itls else 0.0,
        "itl_p99_s": percentile(itls, 99),
        "peak_running": peak_running,
    }


def concurrency_bound(prompt_tokens: float, output_tokens: float, budget: int) -> float:
    """The most concurrency compression can buy at equal memory: a full request holds
    prompt + output rows per layer, a compressed one budget + output."""
    return (prompt_tokens + output_tokens) / (min(budget, prompt_tokens) + output_tokens)
