"""What each policy keeps of full-KV accuracy, with real models through the real engine.

    python -m bench.quality --quick        # smoke: SmolLM2, 4 prompts per cell (<= 15 min, 2 cores)
    python -m bench.quality --standard     # the README's numbers: 100 prompts per cell (~2 h, 2 cores)
    python -m bench.quality --model qwen   # the full sweep (lengths 1k-8k, 200 prompts per cell): hours
    python -m bench.quality --model qwen --tasks code --lengths 4000 --seeds 25

One ``dkv_sglang.Engine`` per run, started with ``--kv-policy dynamickv``; every (case, policy,
budget) is its own request carrying ``custom_params = {"kv_policy": ..., "kv_budget": ...}``
(``{"kv_policy": "full"}`` for full KV), up to 16 in flight at once so SGLang batches them.
Greedy decoding, bfloat16, seeded prompts: the same command gives the same numbers.
Each reply is matched to the rows its layers kept through its request id. Every case is asked
once per (policy, budget), full KV first: SGLang's prefix cache holds the prompt, so only the
first ask pays its prefill. ``followup`` cases first send their document alone (one token).
Tables carry prompt counts, 95% intervals and DynamicKV-vs-SnapKV paired p-values (summary.py).

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

from dkv_sglang.policy.config import PolicyConfig

from . import plots, summary, tasks
from .presets import DEFAULT_ALLOCATION, LABELS, POLICIES, apply_preset, custom_params, default_label, spelled

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
BUDGETS = (32, 64, 128, 256)
# What each model can do with full KV decides its tasks: SmolLM2 fails multi-key (DESIGN 2) and
# spread (measured at full KV, 1k tokens: 0 of 3 in this form, 0 of 6 in two others).
SHARED_TASKS = ("niah", "followup", "cwe", "code", "continuation")
MODEL_TASKS = {"smollm2": SHARED_TASKS, "qwen": (*SHARED_TASKS, "multikey", "spread")}
# Cases per (task, length): len(depths) x seeds (multikey and spread: seeds).
PRESETS = {
    "quick": {"lengths": (1000,), "depths": (0.2, 0.4, 0.6, 0.8), "seeds": 1},
    "standard": {"lengths": (1000,), "depths": (0.1, 0.3, 0.5, 0.7, 0.9), "seeds": 20},
    "full": {"lengths": (1000, 2000, 4000, 8000), "depths": (0.1, 0.3, 0.5, 0.7, 0.9), "seeds": 40},
}
CHUNK = 64  # requests per round (and per save); /dkv/stats keeps the last 256 compressed requests
WINDOW = PolicyConfig.window  # the server's default --kv-window
IN_FLIGHT = 16  # SGLang batches these; more only delays every reply (CPU prefill is compute-bound)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="smoke preset: 4 prompts per cell, <= 15 min")
    size.add_argument("--standard", action="store_true", help="100 prompts per cell, ~2 h on 2 cores")
    p.add_argument("--model", choices=sorted(MODEL_TASKS), default="smollm2")
    p.add_argument("--tasks", nargs="+", choices=tasks.TASKS, help="default: those the model passes at full KV")
    p.add_argument("--lengths", nargs="+", type=int, help="prompt lengths in tokens")
    p.add_argument("--depths", nargs="+", type=float, help="niah needle depths, 0..1")
    p.add_argument("--seeds", type=int, help="cases per (task, length[, depth])")
    p.add_argument("--first-seed", type=int, default=0,
                   help="seeds run from here (default 0): --first-seed 5 --seeds 15 asks the prompts of "
                        "seeds 5-19 only, e.g. to check on held-out prompts a choice made on seeds 0-4")
    p.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    p.add_argument("--policies", nargs="+", choices=LABELS, default=list(POLICIES), metavar="POLICY",
                   help=f"policies to compare with full KV, from {', '.join(LABELS)} (dynamickv:X = "
                        "DynamicKV with --kv-allocation X; default: the four policies)")
    p.add_argument("--max-total-tokens", type=int, default=32768, help="KV pool size in tokens")
    p.add_argument("--kv-window", type=int, default=WINDOW,
                   help=f"the server's --kv-window (default {WINDOW}, the server's own): the last prompt "
                        "tokens whose queries score the prefix, always kept; every budget must exceed it")
    p.add_argument("--name", help="results file stem (default quality-<preset>-<model>)")
    p.add_argument("--reuse", nargs="+", default=[], metavar="JSON",
                   help="results of earlier runs of the same model (bench/results/quality-*.json; a stopped "
                        "run's own file resumes it): requests answered there are taken from them, not asked again; "
                        "with every request answered, no engine starts and only the tables are written")
    args = p.parse_args(argv)
    args.preset = apply_preset(args, PRESETS)
    args.tasks = args.tasks or MODEL_TASKS[args.model]
    args.name = args.name or f"quality-{args.preset}-{args.model}"
    args.default_allocation = DEFAULT_ALLOCATION  # recorded: what "dynamickv" meant in this run
    if args.kv_window < 1 or min(args.budgets) <= args.kv_window:
        p.error(f"--kv-window {args.kv_window}: must be >= 1 and below every --budgets value")
    return args


def requests_for(cases, policies, budgets, block: int = 16) -> list[tuple[tasks.Case, str, int | None]]:
    """Every (case, policy, budget), full KV once per case first. Cases go in blocks of ``block``,
    every config of a block before the next block, so a block's prompts (~16k tokens at 1k each)
    stay in the prefix cache while all its configs ask them; config by config over all cases,
    a preset whose prompts outgrow the pool would prefill every prompt again for every config."""
    configs = [(summary.FULL, None)] + [(p, b) for b in budgets for p in policies]
    blocks = [cases[i:i + block] for i in range(0, len(cases), block)]
    return [(c, p, b) for part in blocks for p, b in configs for c in part]


def load_results(path) -> tuple[dict, list[dict]]:
    """A results file's args and its results, each plain ``dynamickv`` spelled out as the
    allocation that run defaulted to (``reference`` before runs recorded it)."""
    report = json.loads(Path(path).read_text())
    default = report["args"].get("default_allocation", "reference")
    return report["args"], [{**r, "policy": spelled(r["policy"], default)} for r in report["results"]]


def split_reused(requests, paths, model: str, window: int = WINDOW,
                 allocation: str = DEFAULT_ALLOCATION) -> tuple[list[dict], list]:
    """(results found in the ``--reuse`` files for these requests, the requests still to ask).
    A file of another model is an error: its answers would not be this model's. From a file run
    with another ``--kv-window`` only full KV's answers are taken (the window does not touch them).
    A plain ``dynamickv`` means the server's default allocation of its own run (``reference``
    before runs recorded it), so answers match by the spelled-out allocation and are relabeled."""
    known = {}
    for path in paths:
        args, results = load_results(path)
        if args["model"] != model:
            raise SystemExit(f"--reuse: {path} holds {args['model']} results, not {model}")
        same = args.get("kv_window", WINDOW) == window
        known.update({(r["case"], r["policy"], r["budget"]): r for r in results if same or r["policy"] == summary.FULL})
    found, todo = [], []
    for case, policy, budget in requests:
        hit = known.get((case.name, spelled(policy, allocation), budget))
        if hit is None:
            todo.append((case, policy, budget))
        else:
            found.append({**hit, "policy": policy})
    return found, todo


def run(engine, requests, save=lambda results: None) -> list[dict]:
    """Send the requests ``CHUNK`` at a time, ``IN_FLIGHT`` of them at once; one result per request.
    Documents of follow-up cases go first, alone, so the prefix cache holds them. ``save(results)``
    runs after each chunk, so a run stopped early keeps what it finished."""
    from tqdm import tqdm

    warm = list({c.name: c for c, _, _ in requests if c.warm_ids}.values())
    if warm:
        engine.loop.run_until_complete(_warm(engine, warm))
    out = []
    with tqdm(total=len(requests), desc="requests", unit="req") as bar:
        for start in range(0, len(requests), CHUNK):
            chunk = requests[start:start + CHUNK]
            replies = engine.loop.run_until_complete(_send(engine, chunk, bar))
            recent = {r["rid"]: r for r in engine.dkv_stats()["recent"]}
            out += [_result(req, reply, recent) for req, reply in zip(chunk, replies)]
            save(score_continuations(out))
    return score_continuations(out)


async def _warm(engine, cases) -> None:
    gate = asyncio.Semaphore(IN_FLIGHT)

    async def one(case):
        async with gate:
            await engine.async_generate(input_ids=list(case.warm_ids), rid=f"{case.name}.document",
                                        sampling_params={"max_new_tokens": 1, "temperature": 0,
                                                         "custom_params": custom_params(summary.FULL, None)})

    await asyncio.gather(*(one(c) for c in cases))


def score_continuations(results: list[dict]) -> list[dict]:
    """Score each continuation against full KV's reply to the same case (token agreement)."""
    reference = {r["case"]: r["output_ids"] for r in results
                 if r["task"] == "continuation" and r["policy"] == summary.FULL}
    for r in results:
        if r["task"] == "continuation" and r["case"] in reference:
            r["score"], r["first_divergence"] = tasks.agreement(r["output_ids"], reference[r["case"]])
            r["correct"] = r["score"] == 1.0
    return results


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
    entry = recent.get(meta["id"], {})
    kept = meta.get("kv_kept_per_layer") or entry.get("kept_per_layer")
    text = reply["text"]
    score = tasks.graded(case, text)
    out = {"case": case.name, "task": case.task, "length": case.length, "depth": case.depth,
           "seed": case.seed, "policy": policy, "budget": budget, "prompt_tokens": meta["prompt_tokens"],
           "cached_tokens": meta.get("cached_tokens"), "reply": text, "answers": list(case.answers),
           "score": score, "correct": score == 1.0, "answer_first": tasks.answer_first(case, text),
           "kept_per_layer": kept, "kept_per_head": entry.get("kv_kept_per_head")}
    if case.task == "continuation":
        out["output_ids"] = list(reply.get("output_ids") or [])
    return out


def start_engine(model: str, max_total_tokens: int, window: int = WINDOW):
    import dkv_sglang
    from runtime.prepare_model import prepare

    return dkv_sglang.Engine(model_path=str(prepare(model)), kv_policy="dynamickv", kv_budget=128, kv_window=window,
                             dtype="bfloat16", max_total_tokens=max_total_tokens, log_level="error",
                             random_seed=0, watchdog_timeout=3600)  # a busy shared CPU can stall a batch


def write_tables(args, results, wall_s: float) -> list[Path]:
    """The JSON report and the markdown tables (no figures)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / args.name
    report = {"args": {k: v for k, v in vars(args).items()}, "wall_s": round(wall_s, 1),
              "targets": summary.targets(results, args.budgets, policy=default_label(args.policies)),
              "results": results}
    paths = [stem.with_suffix(".json"), stem.with_suffix(".md")]
    paths[0].write_text(json.dumps(report, indent=1))
    paths[1].write_text(markdown(args, results, wall_s))
    return paths


def write(args, results, wall_s: float) -> list[Path]:
    stem = RESULTS / args.name
    budgets = [None, *args.budgets]
    paths = write_tables(args, results, wall_s)
    for policy in [summary.FULL, *args.policies]:
        paths.append(plots.niah_heatmap(results, policy, [None] if policy == summary.FULL else budgets[1:],
                                        Path(f"{stem}-niah-{policy.replace(':', '-')}.png")))
    paths.append(plots.layer_budgets(results, args.budgets, Path(f"{stem}-layers.png")))
    paths.append(plots.allocation_shapes(results, args.budgets, args.policies, Path(f"{stem}-allocations.png")))
    paths.append(plots.head_shapes(results, args.budgets, args.policies, Path(f"{stem}-heads.png")))
    return [p for p in paths if p]


def markdown(args, results, wall_s: float) -> str:
    lines = [f"# {args.name}: {args.model}, tasks {', '.join(args.tasks)}, lengths {args.lengths}, bfloat16, "
             f"--kv-window {args.kv_window}",
             "", summary.markdown(results, [summary.FULL, *args.policies], args.budgets), "## Checks", ""]
    lines += [f"- {c}" for c in summary.checks(results)]
    lines += ["", "## DynamicKV's per-layer budgets by task (kept rows / budget)", ""]
    lines += [f"- {line}" for line in summary.layer_shapes(results, args.budgets, default_label(args.policies))]
    lines += ["", "## Targets", ""]
    lines += [f"- {t['target']}: {t['measured']} -> {'held' if t['held'] else 'FAILED'}"
              for t in summary.targets(results, args.budgets, policy=default_label(args.policies))]
    lines += ["", f"{len(results)} requests, wall time {wall_s / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    from transformers import AutoTokenizer

    from runtime.prepare_model import prepare

    tokenizer = AutoTokenizer.from_pretrained(prepare(args.model))
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    cases = tasks.build(tokenizer, args.tasks, args.lengths, args.depths, seeds)
    requests = requests_for(cases, args.policies, args.budgets)
    reused, requests = split_reused(requests, args.reuse, args.model, args.kv_window)
    print(f"{len(cases)} cases x {(len(requests) + len(reused)) // max(len(cases), 1)} configs = "
          f"{len(requests) + len(reused)} requests ({len(reused)} answered in --reuse files)", file=sys.stderr)
    t0 = time.time()
    new = []
    if requests:  # all answered in --reuse files: only the tables and figures are written again
        engine = start_engine(args.model, args.max_total_tokens, args.kv_window)
        try:
            new = run(engine, requests, save=lambda res: write_tables(args, reused + res, time.time() - t0))
        finally:
            engine.shutdown()
    results = score_continuations(reused + new)
    wall = time.time() - t0
    for path in write(args, results, wall):
        print(path)
    print((RESULTS / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
