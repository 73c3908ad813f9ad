"""Quality results -> accuracy tables, percent of full KV, the issue's targets (pure Python).

A result is one dict per request: ``task``, ``length``, ``depth``, ``policy``, ``budget``
(``None`` for full KV), ``correct`` and, for compressed requests, ``kept_per_layer``.
"Average accuracy" is the mean over tasks of each task's accuracy, so tasks with many cases
(niah) do not outweigh the others.
"""

from __future__ import annotations

from collections import defaultdict
from statistics import mean

FULL = "full"


def key(result: dict) -> tuple[str, int | None]:
    return result["policy"], result["budget"]


def task_accuracy(results, **where) -> dict[str, float]:
    """Accuracy per task over the results matching ``where`` (e.g. policy=..., budget=...)."""
    hits = defaultdict(list)
    for r in results:
        if all(r[k] == v for k, v in where.items()):
            hits[r["task"]].append(bool(r["correct"]))
    return {task: mean(h) for task, h in sorted(hits.items())}


def average(results, **where) -> float | None:
    acc = task_accuracy(results, **where)
    return mean(acc.values()) if acc else None


def percent_of(value: float | None, full: float | None) -> float | None:
    """``value`` as a percentage of ``full``; None when full KV scored nothing (uninformative)."""
    if value is None or not full:
        return None
    return 100.0 * value / full


def grid(results, policies, budgets, **where) -> dict[tuple[str, int], float | None]:
    """Average accuracy of each compressing (policy, budget)."""
    return {(p, b): average(results, policy=p, budget=b, **where) for p in policies for b in budgets}


def markdown(results, policies, budgets) -> str:
    """Average accuracy per policy x budget with percent of full KV, then per task."""
    full = average(results, policy=FULL)
    compressing = [p for p in policies if p != FULL]
    acc = grid(results, compressing, budgets)
    lines = [f"Full KV: {_pct(full)} average accuracy over tasks.", "",
             "| policy | " + " | ".join(f"{b}" for b in budgets) + " |",
             "|---|" + "---|" * len(budgets)]
    for p in compressing:
        cells = [f"{_pct(acc[p, b])} ({_pct(percent_of(acc[p, b], full), ratio=False)} of full)" for b in budgets]
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    lines += ["", "Per task (accuracy; full KV first):", "",
              "| task | full | " + " | ".join(f"{p}@{b}" for p in compressing for b in budgets) + " |",
              "|---|---|" + "---|" * (len(compressing) * len(budgets))]
    full_tasks = task_accuracy(results, policy=FULL)
    for task, f in full_tasks.items():
        cells = [_pct(task_accuracy(results, policy=p, budget=b).get(task)) for p in compressing for b in budgets]
        lines.append(f"| {task} | {_pct(f)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(x: float | None, ratio: bool = True) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.0f}%" if ratio else f"{x:.0f}%"


def niah_grid(results, policy: str, budget: int | None) -> dict[tuple[int, float], float]:
    """NIAH accuracy per (length, depth) for one policy and budget."""
    cells = defaultdict(list)
    for r in results:
        if r["task"] == "niah" and key(r) == (policy, budget):
            cells[r["length"], r["depth"]].append(bool(r["correct"]))
    return {k: mean(v) for k, v in sorted(cells.items())}


def mean_layer_budget(results, policy: str, budget: int) -> dict[str, list[float]]:
    """Per task, the kept rows of each layer averaged over compressed requests, over ``budget``."""
    rows = defaultdict(list)
    for r in results:
        if key(r) == (policy, budget) and r.get("kept_per_layer"):
            rows[r["task"]].append(r["kept_per_layer"])
    return {task: [mean(col) / budget for col in zip(*kept)] for task, kept in sorted(rows.items())}


def targets(results, budgets, long_length: int = 4000) -> list[dict]:
    """The issue's targets, each with what was measured and whether it held."""
    out = []
    for b in [b for b in budgets if b <= 256]:
        d, s, st = (average(results, policy=p, budget=b) for p in ("dynamickv", "snapkv", "streamingllm"))
        if None not in (d, s, st):
            out.append({"target": f"dynamickv >= snapkv >= streamingllm at budget {b}",
                        "measured": f"{100 * d:.0f}% / {100 * s:.0f}% / {100 * st:.0f}%",
                        "held": d >= s >= st})
    d = average(results, policy="dynamickv", budget=128, length=long_length)
    full = average(results, policy=FULL, length=long_length)
    pct = percent_of(d, full)
    if pct is not None:
        out.append({"target": f"dynamickv@128 on {long_length}-token prompts >= 90% of full KV",
                    "measured": f"{pct:.0f}% ({100 * d:.0f}% vs {100 * full:.0f}%)", "held": pct >= 90})
    return out


def checks(results, min_full: float = 0.8) -> list[str]:
    """What makes the table meaningful: full KV passes each task; answers come after the first
    token; StreamingLLM loses mid-context needles (proof that rows were dropped)."""
    out = []
    for task, acc in task_accuracy(results, policy=FULL).items():
        verdict = "usable" if acc >= min_full else f"UNINFORMATIVE (below {100 * min_full:.0f}%)"
        out.append(f"full KV on {task}: {100 * acc:.0f}%: {verdict}")
    correct = [r for r in results if r["correct"]]
    first = sum(r["answer_first"] for r in correct)
    out.append(f"correct replies whose first word is the answer (from the full-KV prefill): {first} of {len(correct)}")
    mid = [r for r in results if r["policy"] == "streamingllm" and r["task"] == "niah"
           and 0.2 <= r["depth"] <= 0.8 and r["budget"] < r["prompt_tokens"]]
    if mid:
        out.append(f"streamingllm on mid-context needles (depth 20-80%): {sum(r['correct'] for r in mid)} of "
                   f"{len(mid)} correct")
    return out
