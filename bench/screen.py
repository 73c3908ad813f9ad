"""Many policies' RULER answers from one prefill per prompt: a screen for slow machines (no server).

    python -m bench.screen --model qwen --tasks ruler_vt --first-prompt 290 --limit 30 --budgets 128 \\
        --policies snapkv snapkv+adaptive dynamickv dynamickv+adaptive

``bench.ruler`` asks the server once per (policy, budget), so every label costs a decode pass and,
where the prefix cache has let the prompt go, a prefill. Here transformers prefills each prompt
once (float32 by default), keeps every layer's window scores (:class:`.needle_layers.ScoreCapture`),
lets each label's own ``select`` choose its rows, and then decodes every (label, budget) and full
KV greedily side by side in one batch, each token attending only to its KV head's kept prompt rows
and to the tokens generated before it (:class:`KeptRowsAttention`). RULER's own prompts, reply
lengths and metric (lm-eval's ``process_results``) score the replies.

``tests/engine/test_reference_decode.py`` holds this decode to the engine: on a tiny Llama in
float32 it reproduces the server's greedy tokens exactly, for uniform and adaptive heads. On a real
model far below full KV, replies are near-ties token after token and any numeric difference moves
them. Qwen2.5-Coder, ``ruler_vt`` at 4k, budget 128, float32 (``screen30-vt-qwen`` against
``server30-vt-qwen``, docs/allocations.md): the screen and the server (``bench.ruler``, requests in
batches of 16) gave the same score on 73 of 100 (prompt, label) replies (full KV 16 of 20); on 5
prompts where SnapKV's differed, the engine asked one request at a time gave a third reply on 3, the
screen's on 1, the server's on 1. So a prompt's answer there depends on batch shape as much as on
the instrument: compare policies over many prompts, use the screen to find where to look
(``--adaptive-layers``), and measure claims against the server (``bench.ruler`` /
``bench.quality``).

Each result also carries two graded measures of the same decode, *kept attention* and *kept answer
attention*: the share of full KV's reply attention (to all prompt rows; to the answer's rows) that a
policy's rows keep. Measured against the server's answers (docs/allocations.md, "Does kept attention
stand in for answers?"), neither ranks policies as answers do (adaptive heads win answers while
keeping less of both): they describe, per layer, what a policy drops, and choose nothing.

Writes ``bench/results/<name>.{json,md}`` in ``bench.ruler``'s format (summary.py's tables,
intervals and paired tests), after every prompt.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

from dkv_sglang.policy import PolicyConfig, select
from dkv_sglang.policy.request import for_request

from . import summary
from .needle_layers import ScoreCapture, layer_scores, needle_tokens
from .presets import DEFAULT_ALLOCATION, LABELS, custom_params
from .ruler import RESULTS, TASKS, ensure_punkt, load_tasks, rows


class KeptRowsAttention:
    """A transformers attention function for a batch whose row ``b`` keeps only the prompt rows
    ``keep[b, layer, kv_head]`` of ``n`` (a [B, L, H_kv, n] bool mask): a query at position < n
    attends causally to everything, one at position >= n to its KV head's kept prompt rows and to
    every later position up to itself. Works for a whole sequence at once and for cached decode."""

    name = "dkv_kept_rows"

    def __init__(self, keep: torch.Tensor, record: list[list[torch.Tensor]] | None = None):
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

        self.keep, self.record = keep, record
        AttentionInterface.register(self.name, self)
        ALL_MASK_ATTENTION_FUNCTIONS.register(self.name, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])

    def __call__(self, module, query, key, value, attention_mask, scaling=None, **kwargs):
        b, hq, q_len, dim = query.shape
        hkv, k_len, n = key.shape[1], key.shape[2], self.keep.shape[-1]
        first = k_len - q_len  # the first query's position
        allowed = torch.ones(q_len, k_len, dtype=torch.bool).tril(diagonal=first).expand(b, hkv, q_len, k_len).clone()
        allowed[:, :, torch.arange(first, k_len) >= n, :n] &= self.keep[:, module.layer_idx, :, None, :]
        # query heads h*g .. h*g+g-1 read KV head h: group them rather than copy the keys
        grouped = query.reshape(b, hkv, hq // hkv * q_len, dim)
        logits = (grouped @ key.transpose(-1, -2) * scaling).view(b, hkv, hq // hkv, q_len, k_len)
        weights = torch.softmax(logits.float().masked_fill(~allowed[:, :, None], float("-inf")), dim=-1)
        if self.record is not None and q_len == 1 and first >= n:  # a decode step: row 0's attention to the prompt
            self.record[module.layer_idx].append(weights[0, :, :, 0, :n].sum(dim=1))
        out = weights.to(value.dtype).view(b, hkv, hq // hkv * q_len, k_len) @ value
        return out.view(b, hq, q_len, dim).transpose(1, 2), None


def prefill(model, capture: ScoreCapture, ids: list[int]):
    """:func:`.needle_layers.layer_scores` keeping the KV cache: (scores, cache, greedy first token)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    scores, first = layer_scores(model, capture, ids, cache)
    return scores, cache, first


def decode(model, cache, first: int, keep: torch.Tensor, steps: int, stop=(),
           record: list[list[torch.Tensor]] | None = None) -> list[list[int]]:
    """Greedy replies of at most ``steps`` tokens (``first`` included), one per row of ``keep``
    ([B, L, H_kv, n]), all from one prompt's ``cache`` (left as it was); a reply ends before the
    first token in ``stop``. ``record`` (one list per layer) gains, per decode step, row 0's
    attention to the prompt rows summed over each KV head's query heads ([H_kv, n])."""
    cache = copy.deepcopy(cache)
    cache.batch_repeat_interleave(keep.shape[0])
    model.set_attn_implementation(KeptRowsAttention(keep, record).name)
    stops = torch.tensor(sorted(stop), dtype=torch.long)
    token = torch.full((keep.shape[0], 1), first)
    out, done = [token], torch.isin(token[:, 0], stops)
    with torch.no_grad():
        while len(out) < steps and not bool(done.all()):
            token = model(token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
            out.append(token)
            done |= torch.isin(token[:, 0], stops)
    replies = []
    for reply in torch.cat(out, dim=1).tolist():
        ends = [i for i, t in enumerate(reply) if t in stop]
        replies.append(reply[: ends[0]] if ends else reply)
    return replies


def reply_attention(record: list[list[torch.Tensor]], reply_len: int) -> torch.Tensor | None:
    """[L, H_kv, n] what the reference reply reads: from :func:`decode`'s ``record`` (row 0 full KV),
    the attention to each prompt row of the queries that fed the reply's ``reply_len`` tokens,
    summed over them and over each KV head's query heads. None: an empty reply."""
    if reply_len == 0 or not record[0]:
        return None
    return torch.stack([torch.stack(steps[:reply_len]).sum(dim=0) for steps in record])


def kept_attention(need: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B, L]: per layer, the share of ``need`` (:func:`reply_attention`) on the rows each mask of
    ``keep`` ([B, L, H_kv, n]) kept, averaged over KV heads (full KV: 1). Dropped rows' share bounds
    how far a layer's attention output can move (Ada-KV's bound); a graded score per prompt."""
    return ((need * keep).sum(dim=-1) / need.sum(dim=-1)).mean(dim=-1)


def kept_answer_attention(need: torch.Tensor, keep: torch.Tensor, rows: list[int]):
    """The share of ``need`` on the answer's prompt ``rows`` that each mask keeps, weighted by the
    attention each (layer, KV head) pays them, so the heads that read the answer count most:
    ([B] over all layers, [B, L] per layer; a layer whose heads pay them nothing counts as 1)."""
    on = need[..., rows]  # [L, H_kv, r]
    kept = (on * keep[..., rows]).sum(dim=(-1, -2))  # [B, L]
    total = on.sum(dim=(-1, -2))  # [L]
    per_layer = torch.where(total > 0, kept / total.clamp_min(1e-30), torch.ones_like(kept))
    return kept.sum(dim=-1) / total.sum(), per_layer


def attention_shares(need: torch.Tensor | None, keep: torch.Tensor, answer_rows: list[int]) -> list[dict]:
    """Per mask of ``keep``, the result fields of :func:`kept_attention` and, when the prompt holds
    the answer, :func:`kept_answer_attention` (each whole, and per layer)."""
    shares = [{} for _ in range(keep.shape[0])]
    if need is None:
        return shares
    for share, layers in zip(shares, kept_attention(need, keep)):
        share.update(kept_attention=layers.mean().item(), kept_attention_per_layer=layers.tolist())
    if answer_rows:
        for share, whole, layers in zip(shares, *kept_answer_attention(need, keep, answer_rows)):
            share.update(kept_answer_attention=whole.item(), kept_answer_attention_per_layer=layers.tolist())
    return shares


def layer_groups(layers: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous, near-equal layer ranges (first, last) covering ``layers``."""
    edges = [round(i * layers / parts) for i in range(parts + 1)]
    return [(edges[i], edges[i + 1] - 1) for i in range(parts)]


def split_labels(policies, layers: int, parts: int) -> list[str]:
    """Every ``X+adaptive`` of ``policies`` with adaptive heads in one layer group only: ``X+adaptive[a-b]``."""
    if not parts:
        return []
    return [f"{p}[{a}-{b}]" for p in policies if p.endswith("+adaptive") for a, b in layer_groups(layers, parts)]


def keep_mask(scores, n: int, label: str, budget: int | None, window: int, shape) -> torch.Tensor:
    """[L, H_kv, n]: what ``label`` at ``budget`` keeps of one prompt (full KV: every row). A label
    ``X+adaptive[a-b]`` keeps what ``X+adaptive`` keeps in layers a-b and what ``X`` keeps elsewhere
    (the layer budgets are the same: adaptive heads only split a layer's count)."""
    name, _, span = label.partition("[")
    if span:
        first, last = map(int, span.rstrip("]").split("-"))
        mask = keep_mask(scores, n, name.removesuffix("+adaptive"), budget, window, shape)
        mask[first : last + 1] = keep_mask(scores, n, name, budget, window, shape)[first : last + 1]
        return mask
    every = torch.ones(*shape, n, dtype=torch.bool)
    if budget is None:  # full KV
        return every
    sel = select(scores, n, for_request(PolicyConfig(policy="dynamickv", budget=budget, window=window),
                                        custom_params(label, budget)))
    return every if sel is None else sel.keep_mask()  # None: the budget cuts nothing


def keep_masks(scores, n: int, configs, window: int, shape) -> torch.Tensor:
    """[len(configs), L, H_kv, n]: :func:`keep_mask` of every (label, budget)."""
    return torch.stack([keep_mask(scores, n, label, budget, window, shape) for label, budget in configs])


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("smollm2", "qwen"), default="smollm2")
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=["ruler_vt"])
    p.add_argument("--length", type=int, default=4096, help="RULER sequence length in tokens")
    p.add_argument("--first-prompt", type=int, default=0, metavar="N", help="start at lm-eval's prompt N of each task")
    p.add_argument("--limit", type=int, default=10, help="prompts per task")
    p.add_argument("--budgets", nargs="+", type=int, default=[128])
    p.add_argument("--policies", nargs="+", choices=LABELS, default=["snapkv", "dynamickv"], metavar="POLICY",
                   help=f"from {', '.join(LABELS)}")
    p.add_argument("--window", type=int, default=PolicyConfig.window, help="the server's --kv-window")
    p.add_argument("--max-gen-toks", type=int, default=48,
                   help="reply length in tokens, in place of each task's own (default 48, as bench.ruler --quick)")
    p.add_argument("--adaptive-layers", type=int, default=0, metavar="K",
                   help="also decode every X+adaptive label with adaptive heads in only one of K contiguous layer "
                        "groups, uniform heads elsewhere (labels X+adaptive[a-b]): which layers' head budgets "
                        "move answers")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="the model's dtype (default float32, where the decode is held to the engine's)")
    p.add_argument("--name", help="results file stem (default screen-<model>)")
    args = p.parse_args(argv)
    if args.first_prompt < 0:
        p.error(f"--first-prompt: {args.first_prompt} is negative")
    if args.limit < 1:
        p.error(f"--limit: {args.limit} must be at least 1")
    if args.adaptive_layers < 0:
        p.error(f"--adaptive-layers: {args.adaptive_layers} is negative")
    if args.adaptive_layers and not any(x.endswith("+adaptive") for x in args.policies):
        p.error("--adaptive-layers: no X+adaptive label in --policies")
    if min(args.budgets) <= args.window:
        p.error(f"--budgets: every budget must exceed --window {args.window}")
    args.name = args.name or f"screen-{args.model}"
    args.default_allocation = DEFAULT_ALLOCATION  # recorded: what "dynamickv" meant in this run
    return args


MEASURES = {
    "kept_attention": "Kept attention: the share of full KV's reply attention to the prompt on kept rows "
                      "(mean over layers and KV heads)",
    "kept_answer_attention": "Kept answer attention: the share of full KV's reply attention to the answer's "
                             "prompt rows on kept rows (weighted by the attention each layer and KV head pays them)",
}


def attention_markdown(results, budgets, field: str) -> str:
    """One measure of :data:`MEASURES` as summary.py's tables (intervals, paired sign tests), and
    per layer the mean difference of every pair it compares."""
    graded = [dict(r, score=r[field]) for r in results if r.get(field) is not None]
    if not graded:
        return f"No {field} recorded.\n"
    labels = list(dict.fromkeys(r["policy"] for r in graded))
    lines = [f"## {MEASURES[field]}", "",
             "Graded per prompt (full KV: 100); not an answer's score: how much of what full KV's answer "
             "reads each policy kept (bench/screen.py).", "",
             summary.markdown(graded, labels, budgets), "Per layer, mean difference over prompts in points:", ""]
    by_case = {(r["case"], r["policy"], r["budget"]): r[f"{field}_per_layer"] for r in graded}
    cases = sorted({r["case"] for r in graded})
    for b in budgets:
        for first, second in summary.pairs(labels):  # full KV pairs with nothing
            diffs = [[100 * (x - y) for x, y in zip(by_case[c, first, b], by_case[c, second, b])]
                     for c in cases if (c, first, b) in by_case and (c, second, b) in by_case]
            if diffs:
                per_layer = [sum(col) / len(col) for col in zip(*diffs)]
                lines.append(f"- {first} - {second} at {b} ({len(diffs)} prompts): "
                             + " ".join(f"{v:+.1f}" for v in per_layer))
    return "\n".join(lines) + "\n"


def markdown(args, results, wall_s: float) -> str:
    head = (f"# {args.name}: RULER screen (transformers, {args.dtype}, one prefill per prompt), {args.model}, "
            f"{args.length} tokens; not the server: see bench/screen.py")
    return "\n".join([head, "", "`python -m bench.screen " + " ".join(sys.argv[1:]) + "`", "",
                      summary.markdown(results, list(dict.fromkeys(r["policy"] for r in results)), args.budgets),
                      *(attention_markdown(results, args.budgets, field) for field in MEASURES),
                      f"{len(results)} scored replies, wall time {wall_s / 60:.1f} min."]) + "\n"


def main(argv=None) -> int:
    args = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runtime.prepare_model import prepare

    model_dir = prepare(args.model)
    ensure_punkt()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads)
    if args.adaptive_layers > shape[0]:
        raise SystemExit(f"--adaptive-layers: {args.adaptive_layers} groups of {args.model}'s {shape[0]} layers")
    labels = args.policies + split_labels(args.policies, shape[0], args.adaptive_layers)
    configs = [(summary.FULL, None)] + [(p, b) for b in args.budgets for p in labels]
    capture = ScoreCapture(args.window)
    stop = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    RESULTS.mkdir(parents=True, exist_ok=True)
    results, t0 = [], time.time()
    with tqdm(total=len(args.tasks) * args.limit, desc="prompts", unit="prompt") as bar:
        for name in args.tasks:
            loaded = load_tasks([name], [args.length], model_dir, args.first_prompt + args.limit)
            ((key, task),) = loaded["tasks"].items()
            docs = list(task.eval_docs)
            for doc_id in range(args.first_prompt, args.first_prompt + args.limit):
                doc = docs[doc_id]
                text = task.fewshot_context(doc, 0, gen_prefix=task.doc_to_prefix(doc))  # what lm-eval sends
                enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
                ids, answer_rows = enc["input_ids"], needle_tokens(text, doc["outputs"], enc["offset_mapping"])
                scores, cache, first = prefill(model, capture, ids)
                keep = keep_masks(scores, len(ids), configs, args.window, shape)
                record = [[] for _ in range(shape[0])]
                replies = decode(model, cache, first, keep, args.max_gen_toks, stop, record)
                shares = attention_shares(reply_attention(record, len(replies[0])), keep, answer_rows)
                for (label, budget), reply, kept, share in zip(configs, replies, keep.sum(dim=-1), shares):
                    text_reply = tok.decode(reply, skip_special_tokens=True)
                    logged = {"doc": doc, "doc_id": doc_id, "filtered_resps": [text_reply],
                              **task.process_results(doc, [text_reply])}
                    (row,) = rows({key: [logged]}, label, budget)
                    if budget is not None:  # rows per (layer, KV head), the window included, as the server reports
                        row.update(kept_per_head=kept.tolist(), kept_per_layer=kept.float().mean(dim=-1).tolist(),
                                   prompt_tokens=len(ids))
                    row.update(share)
                    results.append(row)
                bar.update(1)
                write(args, results, time.time() - t0)
    print((RESULTS / f"{args.name}.md").read_text())
    return 0


def write(args, results, wall_s: float) -> None:
    stem = RESULTS / args.name
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), "wall_s": round(wall_s, 1),
                                                      "results": results}, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(args, results, wall_s))


if __name__ == "__main__":
    sys.exit(main())
