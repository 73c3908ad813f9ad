"""Two runs of one model on the same prompts, paired prompt by prompt: what a server setting changed.

    python -m bench.compare bench/results/quality-standard-smollm2.json bench/results/window16-smollm2.json
    python -m bench.compare bench/results/server-vt.json bench/results/screen-vt.json   # bench.screen vs the server

A setting of the server itself (``--kv-window``) cannot differ between the requests of one run,
so its effect is measured across two runs of the same prompts (same seeds); so is how far
``bench.screen`` (transformers) answers as the server does (``bench.ruler`` results pair the same
way). For every policy label and budget both runs answered, the second run minus the first: the
difference in points, prompts better : worse, and the exact two-sided sign test (summary.py), per
task and pooled.
A plain ``dynamickv`` is read as the allocation its own run defaulted to (``dynamickv:reference``
in runs that did not record one), so runs from before and after a default change pair correctly.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from . import summary
from .quality import load_results as load


def compare(first: Path, second: Path) -> str:
    """Markdown: per label both runs hold, ``second`` minus ``first`` on the prompts both answered."""
    args_a, a = load(first)
    args_b, b = load(second)
    if args_a["model"] != args_b["model"]:
        raise SystemExit(f"{first} is {args_a['model']}, {second} is {args_b['model']}: not the same prompts")
    name_a, name_b = Path(first).stem, Path(second).stem
    cases = {r["case"] for r in a} & {r["case"] for r in b}
    a, b = [r for r in a if r["case"] in cases], [r for r in b if r["case"] in cases]
    labels = sorted({r["policy"] for r in a} & {r["policy"] for r in b} - {summary.FULL})
    lines = [f"# {name_b} vs {name_a} ({args_a['model']}), on the prompts both answered", ""]
    for label in labels:
        budgets = sorted({r["budget"] for r in a if r["policy"] == label} & {r["budget"] for r in b if r["policy"] == label})
        both = [{**r, "policy": f"{label} @ {name}"} for name, rs in ((name_a, a), (name_b, b))
                for r in rs if r["policy"] == label and r["budget"] in budgets]
        tasks = sorted({r["task"] for r in both})
        lines += [summary.paired_markdown(both, tasks, budgets, f"{label} @ {name_b}", f"{label} @ {name_a}")]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("first", type=Path, help="results JSON of the run to compare against")
    p.add_argument("second", type=Path, help="results JSON of the run with the changed setting")
    args = p.parse_args(argv)
    print(compare(args.first, args.second))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
