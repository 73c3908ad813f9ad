"""More requests per GB: full KV vs DynamicKV at equal KV memory, through the real HTTP server.

    python -m bench.throughput --quick        # about 10 minutes on 2 CPU cores
    python -m bench.throughput --preset gpu --model-path /models/Llama-3.1-8B-Instruct

The quick preset starts four servers in turn on the same random-token request stream (a random
8-layer Llama built locally, float32, CPU):

1. ``full``, small pool: ``--max-total-tokens`` fits about 4 requests' full KV;
2. ``dynamickv``, the same small pool: the stream once per budget (per-request ``kv_budget``);
3. ``full``, a pool that fits every request at once: the ceiling compression can approach on a
   machine where decode is compute-bound;
4. ``dynamickv``, the large pool: prefill cost of choosing (small budget vs a budget over the
   prompt, same prompts) and decode step time at the same batch size as (3).

All servers run with ``--disable-radix-cache --disable-overlap-schedule`` (a compressing server
turns overlap off; the prefix cache is off so that a stream sent once per budget never hits
what the previous budget left cached), so the comparisons differ in the policy alone. Results: ``bench/results/
throughput-<preset>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from . import client
from .client import Request
from .metrics import concurrency_bound, summarize
from .server import Server, stats

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Preset:
    name: str
    model_path: str | None  # None: build the random benchmark Llama
    num_prompts: int
    input_min: int
    input_max: int
    output_len: int
    budgets: tuple[int, ...]
    main_budget: int
    small_pool_requests: int | None  # full requests the small pool fits; None: size by memory
    dtype: str
    cost_prompt_len: int
    cost_pairs: int
    decode_batch: int
    decode_output_len: int


QUICK = Preset(
    name="quick", model_path=None, num_prompts=24, input_min=2000, input_max=3200, output_len=128,
    budgets=(64, 128, 256), main_budget=128, small_pool_requests=4, dtype="float32",
    cost_prompt_len=4000, cost_pairs=3, decode_batch=8, decode_output_len=64,
)
# For a GPU machine (not run on CPU): memory-bound decode, pools sized by --mem-fraction-static.
# Its target: more than KV-Compress's 5.18x total throughput over full KV at equal memory.
GPU = Preset(
    name="gpu", model_path=None, num_prompts=1000, input_min=4000, input_max=8000, output_len=256,
    budgets=(128, 256, 512), main_budget=256, small_pool_requests=None, dtype="bfloat16",
    cost_prompt_len=8000, cost_pairs=8, decode_batch=64, decode_output_len=128,
)
PRESETS = {"quick": QUICK, "gpu": GPU}
COMMON_ARGS = ["--disable-radix-cache", "--disable-overlap-schedule", "--log-level", "warning"]


def bench_model() -> str:
    from runtime.tiny_model import build

    return str(build(ROOT / "models" / "bench-llama", layers=8, hidden=256, heads=8, kv_heads=2,
                     head_dim=32, intermediate=768, context=8192))


def workload(p: Preset, seed: int = 0) -> list[list[int]]:
    """The request stream: random token ids, lengths uniform in [input_min, input_max]."""
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.randint(p.input_min, p.input_max))]
            for _ in range(p.num_prompts)]


def server_args(model: str, p: Preset, policy: str, pool_tokens: int | None) -> list[str]:
    args = ["--model-path", model, "--dtype", p.dtype, "--kv-policy", policy, *COMMON_ARGS]
    if policy != "full":
        args += ["--kv-budget", str(p.main_budget)]
    if pool_tokens is not None:
        args += ["--max-total-tokens", str(pool_tokens)]
    return args


def warm_up(url, prompts, p: Preset) -> None:
    """One short request first, so no measured run pays the server's first-use costs."""
    client.run(url, [Request(prompts[0], 8, None)], desc="warm-up")


def run_stream(url, prompts, p: Preset, budget: int | None, label: str) -> dict:
    before = stats(url)
    custom = {"kv_budget": budget} if budget is not None else None
    reqs = [Request(ids, p.output_len, custom) for ids in prompts]
    results, duration, peak = client.run(url, reqs, desc=label)
    after = stats(url)
    out = summarize(results, duration, peak)
    out["retracted"] = after["retracted_requests"] - before["retracted_requests"]
    new = after["recent"][len(before["recent"]):] if budget is not None else []
    L = after["num_layers"]
    prompt_mean = statistics.mean(len(x) for x in prompts)
    if new:
        out["kv_tokens_per_request"] = statistics.mean(sum(r["kept_per_layer"]) / L for r in new) + p.output_len
    else:
        out["kv_tokens_per_request"] = prompt_mean + p.output_len
    return out


def prefill_cost(url, p: Preset) -> dict:
    """Latency of prefill + choosing + one decode step, small budget vs a budget over the
    prompt (nothing chosen), same prompts, interleaved to share the machine's noise."""
    rng = random.Random(1)
    small, whole = [], []
    for _ in range(p.cost_pairs):
        ids = [rng.randrange(100, 40000) for _ in range(p.cost_prompt_len)]
        for budget, bucket in ((p.main_budget, small), (p.cost_prompt_len + 1, whole)):
            results, _, _ = client.run(url, [Request(ids, 2, {"kv_budget": budget})], desc="prefill cost")
            bucket.append(results[0].latency)
    return {"prompt_tokens": p.cost_prompt_len, "latency_small_budget_s": small, "latency_no_choice_s": whole,
            "choose_cost_fraction": statistics.mean(small) / statistics.mean(whole) - 1}


def decode_step(url, prompts, p: Preset, budget: int | None) -> dict:
    """Inter-token latency with ``decode_batch`` requests decoding together."""
    custom = {"kv_budget": budget} if budget is not None else None
    reqs = [Request(ids, p.decode_output_len, custom) for ids in prompts[: p.decode_batch]]
    results, _, peak = client.run(url, reqs, desc="decode step")
    itls = [x for r in results for x in r.itls]
    return {"batch": p.decode_batch, "peak_running": peak, "itl_median_s": statistics.median(itls),
            "itl_mean_s": statistics.mean(itls)}


def check_targets(res: dict) -> list[dict]:
    full, dkv, ceiling = res["full_small_pool"], res["dynamickv_small_pool"][str(res["main_budget"])], res.get("full_large_pool")
    t = [
        ("peak running: dynamickv >= 6x full in the same pool", dkv["peak_running"] / max(full["peak_running"], 1), 6.0),
        ("output tok/s: dynamickv above full in the same pool", dkv["output_tokens_per_s"] / full["output_tokens_per_s"], 1.0),
        ("no failed request", -float(sum(r["failed"] for r in [full, dkv])), 0.0),
    ]
    if ceiling:
        t.append(("output tok/s: dynamickv >= 90% of the large-pool ceiling",
                  dkv["output_tokens_per_s"] / ceiling["output_tokens_per_s"], 0.9))
    if "prefill_cost" in res:
        t.append(("prefill cost of choosing <= 5% of prefill", -res["prefill_cost"]["choose_cost_fraction"], -0.05))
    if "decode_step" in res:
        d = res["decode_step"]
        t.append(("decode step at equal batch: dynamickv no slower than full",
                  d["full"]["itl_median_s"] / d["dynamickv"]["itl_median_s"], 1.0))
    return [{"target": name, "value": round(abs(v), 4), "pass": v >= bound} for name, v, bound in t]


def markdown(res: dict) -> str:
    rows = [("full, small pool", res["full_small_pool"])]
    rows += [(f"dynamickv-{b}, small pool", r) for b, r in res["dynamickv_small_pool"].items()]
    if "full_large_pool" in res:
        rows.append(("full, large pool (ceiling)", res["full_large_pool"]))
    lines = [
        (
            f"Preset `{res['preset']}`: {res['num_prompts']} prompts of {res['input_range'][0]}-{res['input_range'][1]} "
            f"tokens, {res['output_len']} output tokens; small pool {res['small_pool_tokens']} tokens."
        ),
        "",
        "| run | req/s | out tok/s | total tok/s | TTFT mean / p99 (s) | ITL mean / p99 (ms) | peak running | KV tokens/req | retracted | failed |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        lines.append(
            f"| {name} | {r['requests_per_s']:.3f} | {r['output_tokens_per_s']:.1f} | {r['total_tokens_per_s']:.0f} | "
            f"{r['ttft_mean_s']:.1f} / {r['ttft_p99_s']:.1f} | {1e3 * r['itl_mean_s']:.0f} / {1e3 * r['itl_p99_s']:.0f} | "
            f"{r['peak_running']} | {r['kv_tokens_per_request']:.0f} | {r['retracted']} | {r['failed']} |"
        )
    bound = (
        f"Concurrency bound (prompt + output) / (budget + output) at budget {res['main_budget']}: "
        f"{res['concurrency_bound']:.1f}x; reached {res['concurrency_reached']:.1f}x."
    )
    lines += ["", bound, ""]
    if "prefill_cost" in res:
        c = res["prefill_cost"]
        lines.append(f"Prefill cost of choosing at {c['prompt_tokens']} tokens: {100 * c['choose_cost_fraction']:+.1f}%.")
    if "decode_step" in res:
        d = res["decode_step"]
        lines.append(f"Decode step at batch {d['full']['batch']}: full {1e3 * d['full']['itl_median_s']:.1f} ms, "
                     f"dynamickv {1e3 * d['dynamickv']['itl_median_s']:.1f} ms (median inter-token latency).")
    lines += ["", "| target | measured | pass |", "|---|---|---|"]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['pass'] else 'NO'} |" for t in res["targets"]]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    budgets = [int(b) for b in res["dynamickv_small_pool"]]
    dkv = [res["dynamickv_small_pool"][str(b)] for b in budgets]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "output_tokens_per_s", "output tokens/s"), (axes[1], "peak_running", "peak running requests")):
        ax.plot(budgets, [r[key] for r in dkv], "o-", label="dynamickv, small pool")
        ax.axhline(res["full_small_pool"][key], color="gray", ls="--", label="full, small pool")
        if "full_large_pool" in res:
            ax.axhline(res["full_large_pool"][key], color="green", ls=":", label="full, large pool")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets])
        ax.set_xlabel("kv budget (rows per layer)")
        ax.set_ylim(bottom=0)
        ax.set_ylabel(label)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"bench.throughput --preset {res['preset']}: equal KV memory")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the 2-core CPU preset (the default)")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    ap.add_argument("--model-path", help="serve this model (default: the random 8-layer benchmark Llama)")
    ap.add_argument("--num-prompts", type=int, help="override the preset's number of requests")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results folder (default: bench/results)")
    a = ap.parse_args(argv)
    p = PRESETS["quick" if a.quick else a.preset]
    if a.num_prompts:
        p = replace(p, num_prompts=a.num_prompts)
    if a.model_path:
        p = replace(p, model_path=a.model_path)
    if p.name == "gpu" and not p.model_path:
        ap.error("--preset gpu needs --model-path")
    model = p.model_path or bench_model()
    prompts = workload(p)
    prompt_mean = statistics.mean(len(x) for x in prompts)
    small = p.small_pool_requests and p.small_pool_requests * (int(prompt_mean) + p.output_len)
    large = p.num_prompts * (p.input_max + p.output_len) + 1024 if p.small_pool_requests else None
    a.out.mkdir(parents=True, exist_ok=True)
    logs = a.out / f"throughput-{p.name}-logs"
    res = {"preset": p.name, "config": asdict(p), "model": model, "num_prompts": p.num_prompts,
           "input_range": [p.input_min, p.input_max], "output_len": p.output_len,
           "small_pool_tokens": small, "main_budget": p.main_budget}

    print(f"[1] full KV, pool of {small} tokens", file=sys.stderr)
    with Server(server_args(model, p, "full", small), logs / "full-small.log") as url:
        warm_up(url, prompts, p)
        res["full_small_pool"] = run_stream(url, prompts, p, None, "full, small pool")
    print("[2] dynamickv, same pool", file=sys.stderr)
    with Server(server_args(model, p, "dynamickv", small), logs / "dkv-small.log") as url:
        warm_up(url, prompts, p)
        res["dynamickv_small_pool"] = {
            str(b): run_stream(url, prompts, p, b, f"dynamickv-{b}, small pool") for b in p.budgets
        }
    if large:
        print(f"[3] full KV, pool of {large} tokens (ceiling)", file=sys.stderr)
        with Server(server_args(model, p, "full", large), logs / "full-large.log") as url:
            warm_up(url, prompts, p)
            res["full_large_pool"] = run_stream(url, prompts, p, None, "full, large pool")
            full_decode = decode_step(url, prompts, p, None)
        print("[4] dynamickv, large pool: prefill cost and decode step", file=sys.stderr)
        with Server(server_args(model, p, "dynamickv", large), logs / "dkv-large.log") as url:
            warm_up(url, prompts, p)
            res["prefill_cost"] = prefill_cost(url, p)
            res["decode_step"] = {"full": full_decode, "dynamickv": decode_step(url, prompts, p, p.main_budget)}

    main_run = res["dynamickv_small_pool"][str(p.main_budget)]
    res["concurrency_bound"] = concurrency_bound(prompt_mean, p.output_len, p.main_budget)
    res["concurrency_reached"] = main_run["peak_running"] / max(res["full_small_pool"]["peak_running"], 1)
    res["targets"] = check_targets(res)
    stem = a.out / f"throughput-{p.name}"
    stem.with_suffix(".json").write_text(json.dumps(res, indent=2))
    stem.with_suffix(".md").write_text(markdown(res))
    plot(res, stem.with_suffix(".png"))
    print(markdown(res))
    print(f"wrote {stem}.json, .md, .png", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
