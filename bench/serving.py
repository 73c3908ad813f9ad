"""SGLang's own load generator, ``python -m sglang.benchmark.serving`` (``sglang.bench_serving``),
run against a server, plus the two figures it does not report:

- the peak number of requests the server ran at once (polled from ``/dkv/stats`` while the
  load runs: bench_serving counts requests in flight on the client, not running on the server);
- the decode step time while every request of a batch is decoding (from bench_serving's
  per-request TTFT and inter-token latencies, ``--output-details``).

Every run is the ``random-ids`` dataset sent as token ids (``--tokenize-prompt``: exact prompt
lengths), all requests at once (``--request-rate inf``), greedy, ``ignore_eos``, streamed, with
the server's prefix cache flushed first (``--flush-cache``), so a stream sent twice is the same
stream and never a cache hit on what an earlier run left.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import requests


@dataclass(frozen=True)
class Load:
    """One request stream: ``num_prompts`` prompts of ``[input_len * range_ratio, input_len]`` tokens."""

    num_prompts: int
    input_len: int
    range_ratio: float
    output_len: int
    seed: int = 1


def command(url: str, model: str, load: Load, out_file: Path, extra_body: dict | None = None) -> list[str]:
    """The bench_serving command line a user would type for this stream."""
    cmd = [
        sys.executable, "-m", "sglang.benchmark.serving", "--backend", "sglang", "--base-url", url,
        "--model", model, "--tokenizer", model, "--dataset-name", "random-ids", "--tokenize-prompt",
        "--random-input-len", str(load.input_len), "--random-output-len", str(load.output_len),
        "--random-range-ratio", str(load.range_ratio), "--num-prompts", str(load.num_prompts),
        "--request-rate", "inf", "--seed", str(load.seed), "--warmup-requests", "0", "--flush-cache",
        "--output-file", str(out_file), "--output-details",
    ]
    if extra_body:
        cmd += ["--extra-request-body", json.dumps(extra_body)]
    return cmd


class _PeakRunning(threading.Thread):
    """Polls ``/dkv/stats`` for the number of running requests until stopped."""

    def __init__(self, url: str, period: float = 0.2):
        super().__init__(daemon=True)
        self.url, self.period, self.peak = url, period, 0
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.wait(self.period):
            try:
                self.peak = max(self.peak, requests.get(self.url + "/dkv/stats", timeout=30).json()["running_requests"])
            except (requests.RequestException, ValueError, KeyError):
                pass

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        return self.peak


def run(url: str, model: str, load: Load, label: str, extra_body: dict | None = None, log: Path | None = None) -> dict:
    """Run bench_serving once; its result dict plus ``peak_running`` and ``decode_step_ms``."""
    with tempfile.TemporaryDirectory() as tmp:
        out_file = Path(tmp) / "result.jsonl"
        cmd = command(url, model, load, out_file, extra_body)
        print(f"  {label}: {' '.join(cmd[1:])}", file=sys.stderr)
        poller = _PeakRunning(url)
        poller.start()
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        with open(log or os.devnull, "a") as sink:
            proc = subprocess.run(cmd, env=env, stdout=sink, stderr=subprocess.STDOUT)
        peak = poller.stop()
        if proc.returncode != 0 or not out_file.exists():
            raise RuntimeError(f"bench_serving failed (exit {proc.returncode}) for {label}; see {log}")
        result = json.loads(out_file.read_text().splitlines()[-1])
    result["peak_running"] = peak
    result["failed"] = sum(1 for e in result.get("errors", []) if e)
    result["decode_step_ms"] = decode_step_ms(result["ttfts"], result["itls"])
    for key in ("generated_texts", "errors", "itls", "ttfts", "server_info"):
        result.pop(key, None)
    return result


def decode_step_ms(ttfts: list[float], itls: list[list[float]]) -> float | None:
    """Median gap between tokens (ms) while every request of the stream was decoding.

    The requests were sent together: a token of request i arrives at ``ttfts[i] +
    sum(itls[i][:j + 1])``; only the gaps that start once the last request got its first token
    (every prefill done) and end before the first request finished count.
    """
    if not ttfts:
        return None
    all_started = max(ttfts)
    first_done = min(t + sum(gaps) for t, gaps in zip(ttfts, itls))
    steps = []
    for t, gaps in zip(ttfts, itls):
        for gap in gaps:
            if t >= all_started - 1e-9 and t + gap <= first_done + 1e-9:
                steps.append(gap)
            t += gap
    return 1e3 * statistics.median(steps) if steps else None


def concurrency_bound(prompt_len: float, output_len: int, budget: int) -> float:
    """How many more requests fit at equal memory: (prompt + output) / (kept + output)."""
    kept = min(budget, prompt_len)
    return (prompt_len + output_len) / (kept + output_len)
