"""Quality results -> tables with intervals and paired tests, percent of full, targets (pure Python).

A result is one dict per request: ``case``, ``task``, ``length``, ``depth``, ``policy``,
``budget`` (``None`` for full KV), ``score`` in [0, 1] (0/1 for exact tasks, graded for cwe, code
and continuation), ``correct`` and, for compressed requests, ``kept_per_layer``.

Every cell says how many prompts it holds. Intervals are 95%: Wilson for 0/1 tasks, a bootstrap
over prompts for graded ones and for the average over tasks (prompts resampled within each task,
then the mean over tasks). "Average" is the mean over tasks of each task's mean, so tasks with
many cases do not outweigh the others. DynamicKV vs SnapKV is paired on the same prompts: the
exact McNemar test (for graded scores the same exact sign test over prompts where they differ).
"""

from __future__ import annotations

import random
from collections import defaultdict
from statistics import mean

from . import stats

FULL = "full"


def key(result: dict) -> tuple[str, int | None]:
    return result["policy"], result["budget"]


def _score(r: dict) -> float:
    return float(r["score"]) if r.get("score") is not None else float(bool(r["correct"]))


def _matches(result: dict, where: dict) -> bool:
    return all(result[k] == v for k, v in where.items())


def task_scores(results, **where) -> dict[str, list[float]]:
    """Per task, the scores of the results matching ``where`` (e.g. policy=..., budget=...)."""
    out = defaultdict(list)
    for r in results:
        if _matches(r, where):
            out[r["task"]].append(_score(r))
    return dict(sorted(out.items()))


def task_accuracy(results, **where) -> dict[str, float]:
    """Mean score per task over the results matching ``where``."""
    return {task: mean(v) for task, v in task_scores(results, **where).items()}


def average(results, **where) -> float | None:
    acc = task_accuracy(results, **where)
    return mean(acc.values()) if acc else None


def interval(values: list[float]) -> tuple[float, float]:
    """95% interval of a mean score: Wilson when every score is 0 or 1, else bootstrap."""
    if all(v in (0.0, 1.0) for v in values):
        return stats.wilson(int(sum(values)), len(values))
    return stats.bootstrap_mean(values)


def average_interval(per_task: dict[str, list[float]], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Stratified bootstrap of the mean over tasks: prompts resampled within each task (one task:
    that task's own interval)."""
    groups = [v for v in per_task.values() if v]
    if len(groups) == 1:  # one task: its own interval (Wilson when 0/1)
        return interval(groups[0])
    return stratified_interval(groups, reps, seed)


def stratified_interval(groups: list[list[float]], reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of the mean over groups of each group's mean, values resampled
    within each group (a task's prompts stay that task's)."""
    rng = random.Random(seed)
    return stats.percentile_interval([mean(mean(rng.choices(g, k=len(g))) for g in groups) for _ in range(reps)])


def percent_of(value: float | None, full: float | None) -> float | None:
    """``value`` as a percentage of ``full``; None when full KV scored nothing (uninformative)."""
    if value is None or not full:
        return None
    return 100.0 * value / full


def percent_interval(results, policy: str, budget: int, reps: int = 2000, seed: int = 0,
                     **where) -> tuple[float, float, int] | None:
    """95% interval of ``policy``@``budget`` as % of full KV's average, and the prompts it rests on:
    a paired bootstrap, each task's prompts resampled with both their scores (compressed, full)."""
    rows = [r for r in results if _matches(r, where)]
    full = {r["case"]: _score(r) for r in rows if r["policy"] == FULL}
    pairs = defaultdict(list)
    for r in rows:
        if key(r) == (policy, budget) and r["case"] in full:
            pairs[r["task"]].append((_score(r), full[r["case"]]))
    if not pairs:
        return None
    rng = random.Random(seed)
    draws = []
    for _ in range(reps):
        sample = [rng.choices(p, k=len(p)) for p in pairs.values()]
        kept, whole = (mean(mean(x[i] for x in s) for s in sample) for i in (0, 1))
        if whole:
            draws.append(100.0 * kept / whole)
    return (*stats.percentile_interval(draws), sum(map(len, pairs.values()))) if draws else None


def grid(results, policies, budgets, **where) -> dict[tuple[str, int], float | None]:
    """Average score of each compressing (policy, budget)."""
    return {(p, b): average(results, policy=p, budget=b, **where) for p in policies for b in budgets}


def by_prompt(results, policy: str, budget: int | None, task: str | None = None) -> dict[str, float]:
    """``{case name: score}`` of one (policy, budget), optionally one task."""
    return {r["case"]: _score(r) for r in results
            if key(r) == (policy, budget) and (task is None or r["task"] == task)}


def paired(results, first: str, second: str, budget: int, task: str | None = None) -> stats.Paired:
    """Exact McNemar / sign test of ``first`` vs ``second`` at ``budget`` on the prompts both answered."""
    a, b = by_prompt(results, first, budget, task), by_prompt(results, second, budget, task)
    common = set(a) & set(b)
    better = sum(1 for k in common if a[k] > b[k])
    worse = sum(1 for k in common if b[k] > a[k])
    return stats.Paired(len(common), better, worse, stats.binom_two_sided(better, better + worse))


def paired_interval(results, first: str, second: str, budget: int, reps: int = 2000,
                    seed: int = 0) -> tuple[float, float, float] | None:
    """``first`` minus ``second`` as the mean over tasks of per-prompt differences, with a 95%
    stratified bootstrap interval (prompts resampled within each task, on the prompts both
    answered). Unlike the sign test it weighs how far a partial score moved. None: no prompt."""
    diffs = []
    for task in sorted({r["task"] for r in results if key(r) == (first, budget)}):
        a, b = by_prompt(results, first, budget, task), by_prompt(results, second, budget, task)
        if common := sorted(set(a) & set(b)):
            diffs.append([a[k] - b[k] for k in common])
    if not diffs:
        return None
    return (mean(mean(d) for d in diffs), *stratified_interval(diffs, reps, seed))


def cell(values: list[float]) -> str:
    if not values:
        return "n/a"
    lo, hi = interval(values)
    return f"{100 * mean(values):.0f} [{100 * lo:.0f}, {100 * hi:.0f}]"


def markdown(results, policies, budgets) -> str:
    """Average over tasks per policy x budget (interval, % of full), per-task tables, paired tests."""
    compressing = [p for p in policies if p != FULL]
    full_tasks = task_scores(results, policy=FULL)
    full = average(results, policy=FULL)
    counts = sorted({len(v) for b in budgets for p in compressing
                     for v in task_scores(results, policy=p, budget=b).values()})
    lines = [f"Scores in % with 95% intervals; prompts per (task, policy, budget) cell: "
             f"{', '.join(map(str, counts)) or 'none'}; tasks: "
             + ", ".join(f"{t} ({len(v)})" for t, v in full_tasks.items()) + ".", ""]
    if full_tasks:
        lo, hi = average_interval(full_tasks)
        lines += [f"Full KV: {100 * full:.0f} [{100 * lo:.0f}, {100 * hi:.0f}] average over tasks.", ""]
    lines += ["Average over tasks (and as % of full KV's average):", "",
              "| policy | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for p in compressing:
        cells = []
        for b in budgets:
            per_task = task_scores(results, policy=p, budget=b)
            if not per_task:
                cells.append("n/a")
                continue
            avg = average(results, policy=p, budget=b)
            lo, hi = average_interval(per_task)
            cells.append(f"{100 * avg:.0f} [{100 * lo:.0f}, {100 * hi:.0f}] ({_pct(percent_of(avg, full))})")
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    for task, f in full_tasks.items():
        lines += ["", f"**{task}** ({len(f)} prompts per cell; full KV {cell(f)}):", "",
                  "| policy | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
        for p in compressing:
            cells = [cell(task_scores(results, policy=p, budget=b).get(task, [])) for b in budgets]
            lines.append(f"| {p} | " + " | ".join(cells) + " |")
    for first, second in pairs(compressing):
        lines += ["", paired_markdown(results, list(full_tasks), budgets, first, second)]
    return "\n".join(lines) + "\n"


def pairs(labels) -> list[tuple[str, str]]:
    """The paired comparisons a table shows, when both sides ran: every DynamicKV label against
    SnapKV, every named allocation (``dynamickv:X``) against the server's default (plain
    ``dynamickv``, else ``dynamickv:reference``), every ``X+<mode>`` (per-head budgets) against
    ``X``, and every other head mode (``X+shares``, ``X+max``) against ``X+adaptive``."""
    dkv = [p for p in labels if p.split(":")[0].split("+")[0] == "dynamickv"]
    out = [(p, "snapkv") for p in dkv if "snapkv" in labels]
    base = next((b for b in ("dynamickv", "dynamickv:reference") if b in labels), None)
    out += [(p, base) for p in dkv if base and ":" in p and "+" not in p and p != base]
    out += [(p, p.split("+")[0]) for p in labels if "+" in p and p.split("+")[0] in labels]
    adaptive = [(p, p.split("+")[0] + "+adaptive") for p in labels if "+" in p and not p.endswith("+adaptive")]
    return out + [(p, a) for p, a in adaptive if a in labels]


def paired_markdown(results, task_names, budgets, first: str = "dynamickv", second: str = "snapkv") -> str:
    """``first`` minus ``second`` per task and budget: difference in points, prompts won:lost, p."""
    lines = [f"{first} vs {second} on the same prompts (difference in points; prompts where {first} "
             "scored higher : lower; exact two-sided p):", "",
             "| task | " + " | ".join(str(b) for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    for task in [*task_names, None]:
        cells = []
        for b in budgets:
            t = paired(results, first, second, b, task)
            if not t.n:
                cells.append("n/a")
                continue
            d, s = by_prompt(results, first, b, task), by_prompt(results, second, b, task)
            diff = 100 * (mean(d.values()) - mean(s.values()))
            cells.append(f"{diff:+.0f} ({t.first_only}:{t.second_only}, p={stats.fmt_p(t.p_value)})")
        lines.append(f"| {task or 'all tasks (pooled prompts)'} | " + " | ".join(cells) + " |")
    def interval_cell(b):
        iv = paired_interval(results, first, second, b)
        return "n/a" if iv is None else "{:+.1f} [{:+.1f}, {:+.1f}]".format(*(100 * x for x in iv))

    lines.append("| mean over tasks, paired 95% interval | " + " | ".join(map(interval_cell, budgets)) + " |")
    return "\n".join(lines) + "\n"


def _pct(x: float | None, ratio: bool = False) -> str:
    if x is None:
        return "n/a"
    return f"{100 * x:.0f}%" if ratio else f"{x:.0f}% of full"


def niah_grid(results, policy: str, budget: int | None) -> dict[tuple[int, float], float]:
    """NIAH accuracy per (length, depth) for one policy and budget."""
    cells = defaultdict(list)
    for r in results:
        if r["task"] == "niah" and key(r) == (policy, budget):
            cells[r["length"], r["depth"]].append(_score(r))
    return {k: mean(v) for k, v in sorted(cells.items())}


def mean_layer_budget(results, policy: str, budget: int, by_task: bool = True) -> dict[str, list[float]]:
    """Per task (or ``"all"``), the kept rows of each layer averaged over compressed requests,
    over ``budget``."""
    rows = defaultdict(list)
    for r in results:
        if key(r) == (policy, budget) and r.get("kept_per_layer"):
            rows[r["task"] if by_task else "all"].append(r["kept_per_layer"])
    return {task: [mean(col) / budget for col in zip(*kept)] for task, kept in sorted(rows.items())}


def mean_head_budget(results, policy: str, budget: int) -> list[list[float]]:
    """Per KV head, the kept rows of each layer averaged over compressed requests, over
    ``budget`` ([H][L]; empty when no request recorded its heads)."""
    heads = [r["kept_per_head"] for r in results if key(r) == (policy, budget) and r.get("kept_per_head")]
    if not heads:
        return []
    num_layers, num_heads = len(heads[0]), len(heads[0][0])
    return [[mean(req[layer][h] for req in heads) / budget for layer in range(num_layers)] for h in range(num_heads)]


def layer_shapes(results, budgets, policy: str = "dynamickv", top: int = 4) -> list[str]:
    """Per budget: each task's most-funded layers, and how far apart the tasks' per-layer shapes
    are (mean absolute difference of kept rows / budget, over layers, between task pairs)."""
    out = []
    for b in budgets:
        shapes = mean_layer_budget(results, policy, b)
        if not shapes:
            continue
        tops = "; ".join(f"{t}: " + ", ".join(f"L{i} {v:.1f}x" for i, v in
                                             sorted(enumerate(s), key=lambda x: -x[1])[:top])
                         for t, s in shapes.items())
        names = list(shapes)
        gaps = [mean(abs(x - y) for x, y in zip(shapes[a], shapes[c]))
                for i, a in enumerate(names) for c in names[i + 1:]]
        spread = f"; task-to-task mean |difference| {mean(gaps):.2f}x (max {max(gaps):.2f}x)" if gaps else ""
        out.append(f"budget {b}: {tops}{spread}")
    return out


def targets(results, budgets, long_length: int = 4000, policy: str = "dynamickv") -> list[dict]:
    """The issue's targets, each with what was measured and whether it held (``policy``: the
    label that ran the server's default DynamicKV)."""
    out = []
    for b in [b for b in budgets if b <= 256]:
        d, s = (average(results, policy=p, budget=b) for p in (policy, "snapkv"))
        if None not in (d, s):
            t = paired(results, policy, "snapkv", b)
            out.append({"target": f"{policy} >= snapkv averaged over tasks at budget {b}",
                        "measured": f"{100 * d:.1f} vs {100 * s:.1f} ({t.first_only}:{t.second_only} prompts, "
                                    f"p={stats.fmt_p(t.p_value)}: {_verdict(t)})",
                        "held": d >= s})
    d = average(results, policy=policy, budget=128, length=long_length)
    full = average(results, policy=FULL, length=long_length)
    pct = percent_of(d, full)
    if pct is not None:
        ci = percent_interval(results, policy, 128, length=long_length)
        spread = f" [{ci[0]:.0f}, {ci[1]:.0f}], {ci[2]} prompts" if ci else ""
        out.append({"target": f"{policy}@128 on {long_length}-token prompts >= 90% of full KV",
                    "measured": f"{pct:.0f}%{spread} ({100 * d:.0f} vs {100 * full:.0f})", "held": pct >= 90})
    return out


def _verdict(t: stats.Paired) -> str:
    return {"first better": "dynamickv better", "second better": "snapkv better"}.get(t.verdict, t.verdict)


def checks(results, min_full: float = 0.8) -> list[str]:
    """What makes the table meaningful: full KV passes each task; answers come after the first
    token; StreamingLLM loses mid-context needles (proof that rows were dropped)."""
    out = []
    for task, acc in task_accuracy(results, policy=FULL).items():
        if task == "continuation":
            continue  # full KV agrees with itself by definition
        verdict = "usable" if acc >= min_full else f"UNINFORMATIVE (below {100 * min_full:.0f}%)"
        out.append(f"full KV on {task}: {100 * acc:.0f}%: {verdict}")
    correct = [r for r in results if r["correct"] and r["task"] not in ("code", "continuation")]
    first = sum(r["answer_first"] for r in correct)
    out.append(f"correct replies whose first word is the answer (from the full-KV prefill): {first} of {len(correct)}")
    mid = [r for r in results if r["policy"] == "streamingllm" and r["task"] == "niah"
           and 0.2 <= r["depth"] <= 0.8 and r["budget"] < r["prompt_tokens"]]
    if mid:
        out.append(f"streamingllm on mid-context needles (depth 20-80%): {sum(r['correct'] for r in mid)} of "
                   f"{len(mid)} correct")
    return out
