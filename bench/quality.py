"""What each policy keeps of full-KV accuracy, with real models through the real engine.

    python -m bench.quality --quick                  # SmolLM2, the README's table (< 15 min, 2 cores)
    python -m bench.quality --model qwen             # the full sweep on Qwen2.5-Coder-0.5B (hours)
    python -m bench.quality --model qwen --lengths 4000 --budgets 64 128 --tasks niah multikey

One ``dkv_sglang.Engine`` per run, started with ``--kv-policy dynamickv``; every (case, policy,
budget) is its own request carrying ``custom_params = {"kv_policy": ..., "kv_budget": ...}``
(``{"kv_policy": "full"}`` for full KV), up to 16 in flight at once so SGLang batches them.
Greedy decoding, float32, seeded prompts: the same command gives the same numbers.
Each reply is matched to the rows its layers kept through its request id.

Writes ``bench/results/quality-<preset>-<model>.{json,md}``, a NIAH heat map per policy
(``...-niah-<policy>.png``) and DynamicKV's per-layer budget averaged per task (``...-layers.png``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from . import plots, summary, tasks

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
POLICIES = ("dynamickv", "snapkv", "pyramidkv", "streamingllm")
BUDGETS = (32, 64, 128, 256, 512)
# What each model can do with full KV decides its tasks: SmolLM2 fails multi-key (DESIGN 2) and
# spread (measured at full KV, 1k tokens: 0 of 3 in this form, 0 of 6 in two others).
MODEL_TASKS = {"smollm2": ("niah",), "qwen": ("niah", "multikey", "spread")}
PRESETS = {
    "full": {"lengths": (1000, 2000, 4000, 8000), "depths": (0.0, 0.25, 0.5, 0.75, 1.0), "seeds": 2},
    "quick": {"lengths": (1000,), "depths": (0.2, 0.4, 0.6, 0.8), "seeds": 1},
}
CHUNK = 256  # requests per round: /dkv/stats keeps the last 256 compressed requests
IN_FLIGHT = 16  # SGLang batches these; more only delays every reply (CPU prefill is compute-bound)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small preset quoted in the README")
    p.add_argument("--model", choices=sorted(MODEL_TASKS), default="smollm2")
    p.add_argument("--tasks", nargs="+", choices=tasks.TASKS, help="default: those the model passes at full KV")
    p.add_argument("--lengths", nargs="+", type=int, help="prompt lengths in tokens")
    p.add_argument("--depths", nargs="+", type=float, help="niah needle depths, 0..1")
    p.add_argument("--seeds", type=int, help="cases per (task, length[, depth])")
    p.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    p.add_argument("--max-total-tokens", type=int, default=32768, help="KV pool size in tokens")
    p.add_argument("--name", help="results file stem (default quality-<preset>-<model>)")
    args = p.parse_args(argv)
    preset = PRESETS["quick" if args.quick else "full"]
    for k, v in preset.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.tasks = args.tasks or MODEL_TASKS[args.model]
    args.name = args.name or f"quality-{'quick' if args.quick else 'full'}-{args.model}"
    return args


def requests_for(cases, policies, budgets) -> list[tuple[tasks.Case, str, int | None]]:
    """Every (case, policy, budget), full KV once per case, cases interleaved."""
    configs = [(summary.FULL, None)] + [(p, b) for b in budgets for p in policies]
    return [(c, p, b) for p, b in configs for c in cases]


def custom_params(policy: str, budget: int | None) -> dict:
    return {"kv_policy": policy} if budget is None else {"kv_policy": policy, "kv_budget": budget}


def run(engine, requests) -> list[dict]:
    """Send the requests ``CHUNK`` at a time, ``IN_FLIGHT`` of them at once; one result per request."""
    from tqdm import tqdm

    out = []
    with tqdm(total=len(requests), desc="requests", unit="req") as bar:
        for start in range(0, len(requests), CHUNK):
            chunk = requests[start:start + CHUNK]
            replies = engine.loop.run_until_complete(_send(engine, chunk, bar))
            recent = {r["rid"]: r["kept_per_layer"] for r in engine.dkv_stats()["recent"]}
            out += [_result(req, reply, recent) for req, reply in zip(chunk, replies)]
    return out


async def _send(engine, chunk, bar) -> list[dict]:
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(case, policy, budget):
        sampling = {"max_new_tokens": tasks.REPLY_TOKENS[case.task], "temperature": 0,
                    "custom_params": custom_params(policy, budget)}
        async with gate:
            reply = await engine.async_generate(input_ids=list(case.prompt_ids), sampling_params=sampling,
                                                rid=rid(case, policy, budget))
        bar.update()
        return reply

    return await asyncio.gather(*(one(*req) for req in chunk))


def rid(case, policy, budget) -> str:
    return f"{case.name}.{policy}.{budget or 'all'}"


def _result(request, reply, recent) -> dict:
    case, policy, budget = request
    meta = reply["meta_info"]
    kept = meta.get("kv_kept_per_layer") or recent.get(meta["id"])
    return {"case": case.name, "task": case.task, "length": case.length, "depth": case.depth,
            "seed": case.seed, "policy": policy, "budget": budget, "prompt_tokens": meta["prompt_tokens"],
            "reply": reply["text"], "answers": list(case.answers), "correct": tasks.score(case, reply["text"]),
            "answer_first": tasks.answer_first(case, reply["text"]), "kept_per_layer": kept}


def start_engine(model: str, max_total_tokens: int):
    import dkv_sglang
    from runtime.prepare_model import prepare

    return dkv_sglang.Engine(model_path=str(prepare(model)), kv_policy="dynamickv", kv_budget=128,
                             dtype="float32", max_total_tokens=max_total_tokens, log_level="error",
                             random_seed=0)


def write(args, results, wall_s: float) -> list[Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / args.name
    budgets = [None, *args.budgets]
    report = {"args": {k: v for k, v in vars(args).items()}, "wall_s": round(wall_s, 1),
              "targets": summary.targets(results, args.budgets), "results": results}
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(report, indent=1))
    paths[1].write_text(markdown(args, results, wall_s))
    for policy in [summary.FULL, *args.policies]:
        paths.append(plots.niah_heatmap(results, policy, [None] if policy == summary.FULL else budgets[1:],
                                        Path(f"{stem}-niah-{policy}.png")))
    paths.append(plots.layer_budgets(results, args.budgets, Path(f"{stem}-layers.png")))
    return [p for p in paths if p]


def markdown(args, results, wall_s: float) -> str:
    lines = [f"# {args.name}: {args.model}, tasks {', '.join(args.tasks)}, lengths {args.lengths}",
             "", summary.markdown(results, [summary.FULL, *args.policies], args.budgets), "## Checks", ""]
    lines += [f"- {c}" for c in summary.checks(results)]
    lines += ["", "## Targets", ""]
    lines += [f"- {t['target']}: {t['measured']} -> {'held' if t['held'] else 'FAILED'}"
              for t in summary.targets(results, args.budgets)]
    lines += ["", f"{len(results)} requests, wall time {wall_s / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    from transformers import AutoTokenizer

    from runtime.prepare_model import prepare

    tokenizer = AutoTokenizer.from_pretrained(prepare(args.model))
    seeds = range(args.seeds)
    cases = tasks.build(tokenizer, args.tasks, args.lengths, args.depths, seeds)
    requests = requests_for(cases, args.policies, args.budgets)
    print(f"{len(cases)} cases x {len(requests) // max(len(cases), 1)} configs = {len(requests)} requests",
          file=sys.stderr)
    t0 = time.time()
    engine = start_engine(args.model, args.max_total_tokens)
    try:
        results = run(engine, requests)
    finally:
        engine.shutdown()
    wall = time.time() - t0
    for path in write(args, results, wall):
        print(path)
    print((RESULTS / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
