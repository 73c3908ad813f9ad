"""Which layers see the needle, and which layers each allocation funds (issue 14's "why").

    python -m bench.needle_layers                     # SmolLM2, RULER niah_single_1 at 4096 tokens, 15 prompts
    python -m bench.needle_layers --model qwen --task essay_niah_single_2 --limit 30

No server and no generation: the model runs once per prompt in transformers, and every layer's
window scores are the policy's own ``window_scores`` of the queries and keys transformers'
attention sees (the math the server's attention backends run at prefill). Each policy label's own
``select`` then decides the rows that prompt would keep. Per layer, averaged over prompts:

- where the needle is: the best rank of a needle token in the layer's pooled scores (min over KV
  heads; rank 0 = the layer's top row), and the layer's typical (median) pooled score;
- what each label keeps there: rows per KV head, and the share of needle tokens x KV heads kept.

Needle tokens are the prompt tokens that overlap an answer string (RULER's ``outputs``). Keeping
them is necessary, not sufficient, for a right answer: the quality benchmarks measure answers.
Writes ``bench/results/needle-<task>-<model>.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

import torch

from dkv_sglang.policy import PolicyConfig, select, window_scores
from dkv_sglang.policy.request import for_request
from dkv_sglang.policy.scoring import pool_scores

from .presets import LABELS, custom_params
from .ruler import RESULTS, TASKS, ensure_punkt, load_tasks

LABELS_DEFAULT = ("snapkv", "dynamickv", "dynamickv:reference", "dynamickv:contrast")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "qwen"), default="smollm2")
    p.add_argument("--task", default="niah_single_1", choices=TASKS, help="a RULER task of bench.ruler")
    p.add_argument("--length", type=int, default=4096, help="RULER sequence length in tokens")
    p.add_argument("--limit", type=int, default=15, help="prompts (the first N lm-eval builds)")
    p.add_argument("--budgets", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--policies", nargs="+", choices=LABELS, default=list(LABELS_DEFAULT), metavar="POLICY")
    p.add_argument("--window", type=int, default=PolicyConfig.window, help="the server's --kv-window")
    args = p.parse_args(argv)
    args.detail_budget = args.budgets[len(args.budgets) // 2]  # the budget of the per-layer table and plot
    if min(args.budgets) <= args.window:
        p.error(f"--budgets: every budget must exceed --window {args.window}")
    return args


def needle_tokens(text: str, answers, offsets) -> list[int]:
    """Indices of the tokens (``offsets``: each token's (start, end) in ``text``) that overlap
    any occurrence of any answer string."""
    spans = [m.span() for a in answers for m in re.finditer(re.escape(a), text)]
    return [t for t, (s, e) in enumerate(offsets) if any(s < end and e > start for start, end in spans)]


class ScoreCapture:
    """A transformers attention function that records every layer's window scores, then runs SDPA."""

    name = "dkv_window_scores"

    def __init__(self, window: int):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        self.window, self.scores = window, []
        self._sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        AttentionInterface.register(self.name, self)
        ALL_MASK_ATTENTION_FUNCTIONS.register(self.name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        n, w = key.shape[2], self.window  # query, key: [1, heads, n, D] after RoPE
        self.scores.append(window_scores(query[0, :, n - w:].transpose(0, 1), key[0], scaling)[:, : n - w])
        return self._sdpa(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


def layer_scores(model, capture: ScoreCapture, ids: list[int], cache=None) -> tuple[list[torch.Tensor], int]:
    """One prompt through ``model``: per layer, [KV heads, n - window] window scores, and the
    greedy next token. ``cache`` (a transformers cache), when given, keeps the prompt's keys and values."""
    capture.scores = []
    model.set_attn_implementation(capture.name)
    with torch.no_grad():
        logits = model(torch.tensor([ids]), past_key_values=cache, use_cache=cache is not None).logits[0, -1]
    return [s.float() for s in capture.scores], int(logits.argmax())


def analyse(scores, n: int, needle: list[int], labels, budgets, window: int) -> dict:
    """One prompt's per-layer facts (see the module docstring)."""
    needle = [p for p in needle if p < n - window]
    out = {"prompt_tokens": n, "needle_tokens": len(needle), "rank": [], "median": [], "kept": {}, "needle_kept": {}}
    for s in scores:
        pooled = pool_scores(s, PolicyConfig.kernel, PolicyConfig.pooling)
        rank = pooled.argsort(dim=-1, descending=True, stable=True).argsort(dim=-1)  # position -> rank
        out["rank"].append(int(rank[:, needle].min()) if needle else None)
        out["median"].append(float(pooled.median(dim=-1).values.mean()))
    for budget in budgets:
        for label in labels:
            cfg = for_request(PolicyConfig(policy="dynamickv", budget=budget, window=window), custom_params(label, budget))
            sel = select(scores, n, cfg)
            key = f"{label}@{budget}"
            out["kept"][key] = sel.kept_per_layer
            out["needle_kept"][key] = sel.keep_mask()[:, :, needle].float().mean(dim=(1, 2)).tolist() if needle else None
    return out


def summarise(prompts: list[dict]) -> dict:
    """Per-layer means over prompts of every list in :func:`analyse`'s entries."""
    mean = lambda rows: [statistics.mean(col) for col in zip(*rows)]  # noqa: E731
    with_needle = [p for p in prompts if p["needle_tokens"]]
    keys = prompts[0]["kept"]
    return {
        "prompts": len(prompts), "with_needle": len(with_needle),
        "rank": [statistics.median(col) for col in zip(*(p["rank"] for p in with_needle))],
        "median": mean(p["median"] for p in prompts),
        "kept": {k: mean(p["kept"][k] for p in prompts) for k in keys},
        "needle_kept": {k: mean(p["needle_kept"][k] for p in with_needle) for k in keys},
    }


def markdown(args, s: dict) -> str:
    keys = list(s["kept"])
    lines = [f"# Needle rows per layer: {args.task}, {args.model}, {args.length} tokens, {s['with_needle']} prompts", "",
             "`python -m bench.needle_layers " + " ".join(sys.argv[1:]) + "`", "",
             "Share of needle tokens x KV heads kept, all layers:", "",
             "| policy | " + " | ".join(f"budget {b}" for b in args.budgets) + " |",
             "|---|" + "---|" * len(args.budgets)]
    for label in args.policies:
        cells = [f"{100 * statistics.mean(s['needle_kept'][f'{label}@{b}']):.0f}%" for b in args.budgets]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", f"Per layer (needle rank: median over prompts of the best needle token's rank; rows kept per "
              f"KV head and needle share kept at budget {args.detail_budget}):", ""]
    mid = [k for k in keys if k.endswith(f"@{args.detail_budget}")]
    lines += ["| layer | needle rank | median score | " + " | ".join(mid) + " |", "|---|---|---|" + "---|" * len(mid)]
    for layer, rank in enumerate(s["rank"]):
        cells = [f"{s['kept'][k][layer]:.0f} ({100 * s['needle_kept'][k][layer]:.0f}%)" for k in mid]
        lines.append(f"| {layer} | {rank:.0f} | {s['median'][layer]:.1e} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(args, s: dict, path: Path) -> Path:
    from .plots import plt

    budget = args.detail_budget
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    layers = range(len(s["rank"]))
    top.semilogy(layers, [r + 1 for r in s["rank"]], marker="o", color="black")
    top.axhline(budget - args.window, color="grey", ls=":", lw=0.8)
    top.set_ylabel("best needle rank + 1")
    top.set_title(f"{args.model}, {args.task}, {args.length} tokens, {s['with_needle']} prompts\n"
                  f"where the needle ranks in each layer (dotted: budget {budget} less the window)")
    for label in args.policies:
        bottom.plot(layers, s["kept"][f"{label}@{budget}"], marker=".", label=label)
    bottom.set_ylabel(f"rows per KV head at budget {budget}")
    bottom.set_xlabel("layer")
    bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runtime.prepare_model import prepare

    args = parse(argv)
    model_dir = prepare(args.model)
    ensure_punkt()
    ((_, task),) = load_tasks([args.task], [args.length], model_dir, args.limit)["tasks"].items()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).eval()
    capture = ScoreCapture(args.window)
    prompts = []
    for doc in tqdm(list(task.eval_docs)[: args.limit], desc="prompts", unit="prompt"):
        text = task.fewshot_context(doc, 0, gen_prefix=task.doc_to_prefix(doc))  # what lm-eval sends
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        scores, _ = layer_scores(model, capture, enc["input_ids"])
        needle = needle_tokens(text, doc["outputs"], enc["offset_mapping"])
        prompts.append(analyse(scores, len(enc["input_ids"]), needle, args.policies, args.budgets, args.window))
    s = summarise(prompts)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stem = RESULTS / f"needle-{args.task}-{args.model}"
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), "summary": s, "prompts": prompts}))
    stem.with_suffix(".md").write_text(markdown(args, s))
    print(markdown(args, s))
    print(f"wrote {stem}.{{json,md}} and {plot(args, s, stem.with_suffix('.png'))}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
