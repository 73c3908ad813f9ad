"""DynamicKV re-stated the plain way (loops, one request, query heads) as DESIGN.md section 4
describes the released code, and compared with our vectorised policy on random inputs.

Our changes cannot matter here: one KV head per query head, one request, ``fill_surplus``
off, and prompts long enough that no layer's budget reaches ``n - ws``. The released code
leaves ties to ``torch.topk``; we fix them (earlier position, then earlier layer first), and
so does this re-statement: max pooling makes plateaus of equal scores, so ties are common.
"""

from __future__ import annotations

import math

import pytest
import torch

from dkv_sglang.policy import PolicyConfig, select, window_scores


def reference_scores(q_win, keys, scale):
    """Per query head h and prefix token j: sum over window queries of softmax attention."""
    ws, heads, _ = q_win.shape
    n = keys.shape[1]
    out = []
    for h in range(heads):
        row = [0.0] * (n - ws)
        for i in range(ws):
            pos = n - ws + i
            logits = torch.stack([(q_win[i, h] * keys[h, j]).sum() * scale for j in range(pos + 1)])
            attn = torch.softmax(logits.float(), dim=0)
            for j in range(n - ws):
                row[j] += float(attn[j])
        out.append(row)
    return out


def reference_pool(row, kernel, pooling):
    pad = kernel // 2
    pooled = []
    for j in range(len(row)):
        window = [row[t] for t in range(j - pad, j + pad + 1) if 0 <= t < len(row)]
        if pooling == "avg":
            pooled.append(sum(window) / kernel)  # zero padding counts in the mean
        else:
            pooled.append(max(window))
    return pooled


def reference_dynamickv(per_layer_scores, n, cfg):
    """Kept prefix positions per layer and head, the reference's way."""
    L = len(per_layer_scores)
    heads = len(per_layer_scores[0])
    ws, base = cfg.window, cfg.budget - cfg.window
    bs = min(cfg.rmax * base, n - ws)
    held = []  # per layer, per head: [(score, position)] best first
    for layer in range(L):
        per_head = []
        for h in range(heads):
            pooled = reference_pool(per_layer_scores[layer][h], cfg.kernel, cfg.pooling)
            ranked = sorted(((s, j) for j, s in enumerate(pooled)), key=lambda e: (-e[0], e[1]))
            per_head.append(ranked[:bs])
        held.append(per_head)
        if layer % cfg.update_interval == cfg.update_interval - 1 or layer == L - 1:
            seen = layer + 1
            candidates = [(s, l) for l in range(seen) for h in range(heads) for s, _ in held[l][h]]
            candidates.sort(key=lambda e: (-e[0], e[1]))  # ties: earlier layers first
            counts = [0] * seen
            for _, l in candidates[: base * heads * seen]:
                counts[l] += 1
            c = [x // seen for x in counts]
            total = base * L
            budgets = [total * x // sum(c) for x in c] if sum(c) else [total // seen] * seen
            budgets[-1] += total - sum(budgets)
            budgets = [min(b, n - ws) for b in budgets]
            for l in range(seen):
                held[l] = [entries[: budgets[l]] for entries in held[l]]
    return [[sorted(j for _, j in entries) + list(range(n - ws, n)) for entries in held[l]] for l in range(L)]


@pytest.mark.parametrize("seed, n, layers, heads, budget, pooling, interval", [
    (0, 96, 6, 2, 16, "avg", 4),
    (1, 120, 5, 3, 24, "max", 2),
    (2, 150, 8, 1, 12, "avg", 3),
    (3, 80, 4, 2, 20, "avg", 1),
])
def test_policy_keeps_the_reference_token_sets(seed, n, layers, heads, budget, pooling, interval):
    g = torch.Generator().manual_seed(seed)
    cfg = PolicyConfig(policy="dynamickv", budget=budget, window=8, kernel=7, pooling=pooling,
                       rmax=2, update_interval=interval, fill_surplus=False, allocation="reference")
    assert cfg.rmax * cfg.base < n - cfg.window  # no capping by the prompt
    d = 8
    scale = 1 / math.sqrt(d)
    ours, theirs = [], []
    for _ in range(layers):
        # keys with a few loud tokens per head, so layers differ in how peaked they are
        keys = torch.randn(heads, n, d, generator=g) * torch.rand(heads, n, 1, generator=g).pow(3) * 4
        q_win = torch.randn(cfg.window, heads, d, generator=g)
        ours.append(window_scores(q_win, keys, scale))
        theirs.append(reference_scores(q_win, keys, scale))
    for o, t in zip(ours, theirs):
        assert torch.allclose(o, torch.tensor(t), atol=1e-5)
    selection = select(ours, n, cfg)
    expected = reference_dynamickv(theirs, n, cfg)
    assert [k.tolist() for k in selection.kept] == expected
    assert len({len(k[0]) for k in expected}) > 1, "layers got different budgets: the test bites"
