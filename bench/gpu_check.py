"""The FlashInfer path on a GPU, in one run: correctness, decode speed, greedy equivalence.

Run through ``bench/gpu_check.sh`` (its header says how). Needs torch with CUDA and FlashInfer
0.7.2; does not need SGLang (the device image's torch is not SGLang's pin, and ``sgl_kernel`` is too
large to carry): it drives the same code the SGLang backend runs (``page_table``,
``flashinfer_kernels``, ``RowTable``), and writes one JSON (``$OUT/gpu_check.json``) after every part,
so a run cut short still reports what it finished.

1. ``correctness``: FlashInfer vs the torch paged reference and a direct SDPA over the row table, on
   random compressed batches (each layer and KV head its own rows), every layer; decode eager, decode
   replayed from a CUDA graph after re-planning a different batch, and prefill (ragged + compressed
   prefix); bf16; group sizes 3 (CUDA-core decode) and 4 (tensor-core decode).
2. ``decode_speed``: one decode step's attention over all layers at batch 1/32/128, ours (per-layer
   tables, one entry per request and KV head) vs FlashInfer driven as SGLang 0.5.23's backend drives
   it on full KV (one plan, ``[tokens, H, D]`` buffers per layer, same wrapper settings), with the same
   rows attended; kernels timed in CUDA graphs; planning (host) timed apart.
   ``correctness_page16``: decode and prefill over the paged pool (``--page-size 16``: rows placed
   per request, compressed and packed, one decode token appended), FlashInfer vs reference vs SDPA.
4. ``host_cost``: ``bench/host_cost.py``'s counts on device tensors (ATen ops, sync ops, host ms
   and device ms of a decode step's metadata at an 8B model's shape, batch 1 to 256), the
   FlashInfer ``plan`` calls of that step (host ms, all layers), and the batched selection
   (``policy.select_batch``) of 1 and 16 requests of 4k-32k tokens; with CUDA's sync debug mode
   counting any implicit synchronisation.
3. ``greedy``: a tiny random Llama-style model generating greedily with attention through our path
   at a budget above the prompt length vs plain SDPA with a full cache; token-for-token.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dkv_sglang.attention import page_table as pt
from dkv_sglang.attention.flashinfer_kernels import FlashInferKernels, attend_extend
from dkv_sglang.attention.paged_reference import TorchPagedKernels
from dkv_sglang.memory.row_table import RowTable

OUT = Path(os.environ.get("OUT", "/tmp")) / "gpu_check.json"
DRY = os.environ.get("DKV_GPU_CHECK_DRY") == "1"  # CPU dry run of the script's logic: torch kernels, fp32
DEV = "cpu" if DRY else "cuda"
DT = torch.float32 if DRY else torch.bfloat16
TOL = 2e-2  # bf16: outputs are convex combinations of N(0, 1) values
RESULT: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%S")}


def save() -> None:
    OUT.write_text(json.dumps(RESULT, indent=1, default=str))


def part(name):
    def wrap(fn):
        def run(*a, **k):
            t = time.time()
            try:
                RESULT[name] = fn(*a, **k)
            except Exception as e:  # noqa: BLE001  (report and go on to the next part)
                RESULT[name] = {"error": repr(e), "trace": traceback.format_exc()[-3000:]}
            RESULT[name + "_seconds"] = round(time.time() - t, 1)
            print(name, json.dumps(RESULT[name], default=str)[:2000], flush=True)
            save()

        return run

    return wrap


# -- a pool with compressed requests ---------------------------------------------------------------------
def make_pool(layers, heads, d, lens, keep_frac, seed, extra_tokens=0):
    """A row table + K/V rows holding requests of ``lens`` tokens, each (layer, head) keeping
    a random ``keep_frac`` of its prompt (the last token always)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    table = RowTable(layers, heads, sum(lens) + extra_tokens + 8, 2 * (sum(lens) + extra_tokens) + 8, device=DEV)
    k_rows = torch.randn(table.num_rows + 1, d, dtype=DT, device=DEV)
    v_rows = torch.randn(table.num_rows + 1, d, dtype=DT, device=DEV)
    reqs = [table.alloc(n) for n in lens]
    if keep_frac < 1:
        for vids in reqs:
            keep = torch.rand(layers, heads, len(vids), generator=g) < keep_frac
            keep[..., -1] = True
            table.drop(vids, keep.to(DEV))
    return table, k_rows, v_rows, reqs


def sdpa_rows(q_entry, k_rows, v_rows, rows, scale):
    """Direct attention of [n, G, D] queries over explicit rows (no page table involved)."""
    k, v = k_rows[rows].float(), v_rows[rows].float()
    p = torch.softmax(torch.einsum("ngd,kd->gnk", q_entry.float(), k) * scale, -1)
    return torch.einsum("gnk,kd->ngd", p, v)


def decode_errors(fi, ref, tables, table, reqs, q, k_rows, v_rows, scale) -> tuple[float, float]:
    """One decode step planned on ``tables``, every layer: max |FlashInfer - reference| and max
    |FlashInfer - SDPA over exactly the rows each (request, layer, head) holds|."""
    entries, group, d = q.shape
    heads = entries // len(reqs)
    fi.plan_decode(tables, group, d, q.dtype)
    ref.plan_decode(tables, group, d, q.dtype)
    err_ref, err_sdpa = 0.0, 0.0
    for layer in range(table.num_layers):
        o = fi.decode(layer, q, k_rows, v_rows, scale).float()
        err_ref = max(err_ref, (o - ref.decode(layer, q, k_rows, v_rows, scale).float()).abs().max().item())
        for i, r in enumerate(reqs):
            for h in range(heads):
                rows = table.row_of[layer, h, r]
                want = sdpa_rows(q[i * heads + h][None], k_rows, v_rows, rows[rows >= 0].long(), scale)[0]
                err_sdpa = max(err_sdpa, (o[i * heads + h] - want).abs().max().item())
    return err_ref, err_sdpa


def prefill_error(fi, ref, tables, ext, layers, heads, group, d, k_rows, v_rows, scale) -> float:
    """Max |FlashInfer - reference| over every layer of one prefill: new tokens ``ext`` per
    request (ragged, causal) over each (layer, head)'s paged prefix ``tables``."""
    t = sum(ext)
    qp = torch.randn(t, heads * group, d, dtype=DT, device=DEV)
    kp = torch.randn(t, heads, d, dtype=DT, device=DEV)
    vp = torch.randn(t, heads, d, dtype=DT, device=DEV)
    ragged_qo = torch.zeros(len(ext) + 1, dtype=torch.int32)
    ragged_qo[1:] = torch.cumsum(torch.tensor(ext), 0)
    order = pt.query_order(ext, heads, DEV)
    for kern in (fi, ref):
        kern.plan_extend(ragged_qo, tables, pt.qo_indptr(ext, heads), heads * group, d, DT)
    err = 0.0
    for layer in range(layers):
        a = attend_extend(fi, layer, qp, kp, vp, k_rows, v_rows, scale, order, heads).float()
        b = attend_extend(ref, layer, qp, kp, vp, k_rows, v_rows, scale, order, heads).float()
        err = max(err, (a - b).abs().max().item())
    return err


@part("correctness")
def correctness():
    out = {}
    for group in (3, 4):
        layers, heads, d = 4, 2, 128
        scale = d**-0.5
        lens = [700, 33, 1500, 260, 9]
        table, k_rows, v_rows, reqs = make_pool(layers, heads, d, lens, 0.4, seed=group, extra_tokens=64)
        fi = FlashInferKernels(layers, heads, group, d, DT, DEV, max_rows=table.num_rows + 1)
        ref = TorchPagedKernels()
        vids = torch.cat(reqs)
        tables = pt.build_tables(table.row_of, vids, lens)
        q = torch.randn(len(lens) * heads, group, d, dtype=DT, device=DEV)
        err_ref, err_sdpa = decode_errors(fi, ref, tables, table, reqs, q, k_rows, v_rows, scale)
        # CUDA graph: capture on one batch, re-plan another of the same size, replay
        fi.init_graphs()
        fi.graph_decode(len(lens) * heads)
        fi.plan_decode(tables, group, d, DT)
        outs = [torch.empty(len(lens) * heads, group, d, dtype=DT, device=DEV) for _ in range(layers)]
        graph = torch.cuda.CUDAGraph()
        for layer in range(layers):  # warm up outside capture
            outs[layer].copy_(fi.decode(layer, q, k_rows, v_rows, scale))
        with torch.cuda.graph(graph):
            for layer in range(layers):
                outs[layer].copy_(fi.decode(layer, q, k_rows, v_rows, scale))
        table2_keep = torch.rand(layers, heads, len(vids), device=DEV) < 0.5
        table2_keep[..., -1] = True
        table.drop(vids, table2_keep)
        tables2 = pt.build_tables(table.row_of, vids, lens)
        fi.plan_decode(tables2, group, d, DT)
        ref.plan_decode(tables2, group, d, DT)
        graph.replay()
        torch.cuda.synchronize()
        err_graph = max(
            (outs[layer].float() - ref.decode(layer, q, k_rows, v_rows, scale).float()).abs().max().item()
            for layer in range(layers)
        )
        fi.eager_decode()
        # prefill: new tokens (ragged, causal) + each (layer, head)'s compressed prefix (paged)
        ext = [17, 1, 64, 5, 30]
        new_ids = [table.alloc(e) for e in ext]
        err_prefill = prefill_error(fi, ref, tables2, ext, layers, heads, group, d, k_rows, v_rows, scale)
        for ids in new_ids:
            table.free(ids)
        out[f"group{group}"] = {
            "tensor_cores": fi.tensor_cores,
            "decode_vs_reference": err_ref,
            "decode_vs_sdpa": err_sdpa,
            "decode_graph_replanned_vs_reference": err_graph,
            "prefill_vs_reference": err_prefill,
            "ok": max(err_ref, err_sdpa, err_graph, err_prefill) < TOL,
        }
    return out


@part("correctness_page16")
def correctness_page16(make_kernels=None):
    """The same checks over the paged pool (``--page-size 16``): rows placed request by request,
    compressed (kept rows packed into each entry's first pages), tables of page ids."""
    from dkv_sglang.memory.paged_table import PagedRowTable

    p, layers, heads, group, d = 16, 4, 2, 4, 128
    scale = d**-0.5
    lens = [700, 33, 1500, 260, 9]
    g = torch.Generator(device="cpu").manual_seed(7)
    table = PagedRowTable(layers, heads, 2 * sum(lens) + 512, 4 * sum(lens) + 512, p, device=DEV)
    k_rows = torch.randn(table.num_rows + 1, d, dtype=DT, device=DEV)
    v_rows = torch.randn(table.num_rows + 1, d, dtype=DT, device=DEV)

    def move(src, dst):
        k_rows[dst], v_rows[dst] = k_rows[src].clone(), v_rows[src].clone()

    table.move = move
    vids = table.alloc(sum(lens))
    table.place(torch.zeros(len(lens), dtype=torch.int64), lens, vids)
    reqs = list(torch.split(vids, lens))
    for r in reqs:
        keep = torch.rand(layers, heads, len(r), generator=g) < 0.4
        keep[..., -1] = True
        table.drop(r, keep.to(DEV))
    step = table.alloc(len(lens))  # one decode token each, appended to its last pages
    table.place(torch.stack([r[-1] for r in reqs]), [1] * len(lens), step)
    reqs = [torch.cat([r, step[i : i + 1]]) for i, r in enumerate(reqs)]
    seq = [len(r) for r in reqs]
    tables = pt.build_tables(table.row_of, torch.cat(reqs), seq, p)
    fi = (make_kernels or FlashInferKernels)(layers, heads, group, d, DT, DEV, max_rows=table.num_rows + 1, page_size=p)
    ref = TorchPagedKernels()
    q = torch.randn(len(lens) * heads, group, d, dtype=DT, device=DEV)
    err_ref, err_sdpa = decode_errors(fi, ref, tables, table, reqs, q, k_rows, v_rows, scale)
    err_prefill = prefill_error(fi, ref, tables, [17, 1, 64, 5, 30], layers, heads, group, d, k_rows, v_rows, scale)
    table.check()
    return {
        "page_size": p,
        "pages_used": table.num_pages - len(table.pages),
        "decode_vs_reference": err_ref,
        "decode_vs_sdpa": err_sdpa,
        "prefill_vs_reference": err_prefill,
        "ok": max(err_ref, err_sdpa, err_prefill) < TOL,
    }


# -- decode speed ---------------------------------------------------------------------------------------------
def cuda_time(fn, reps=50) -> float:
    """ms per call of ``fn`` captured in a CUDA graph."""
    for _ in range(3):
        fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@part("decode_speed")
def decode_speed():
    import flashinfer

    layers, heads, group, d = 32, 8, 4, 128  # Llama-3-8B's attention shape
    prompt, kept = 2048, 1024  # each (layer, head) keeps 1024 of 2048 rows; SGLang attends 1024 rows
    scale = d**-0.5
    out = {"shape": {"layers": layers, "kv_heads": heads, "group": group, "head_dim": d, "rows_attended": kept}}
    for bs in (1, 32, 128):
        table = RowTable(layers, heads, bs * prompt + 8, bs * prompt + 8, device=DEV)
        reqs = [table.alloc(prompt) for _ in range(bs)]
        vids = torch.cat(reqs)
        keep = torch.zeros(layers, heads, len(vids), dtype=torch.bool, device=DEV)
        for i in range(bs):  # exactly `kept` rows per (request, layer, head), scattered
            pick = torch.rand(layers, heads, prompt, device=DEV).argsort(-1)[..., :kept]
            keep[:, :, i * prompt : (i + 1) * prompt].scatter_(2, pick, True)
        table.drop(vids, keep)
        k_rows = torch.randn(table.num_rows + 1, d, dtype=DT, device=DEV)
        v_rows = torch.randn_like(k_rows)
        lens = [prompt] * bs
        fi = FlashInferKernels(layers, heads, group, d, DT, DEV, max_rows=table.num_rows + 1)
        fi.init_graphs()
        fi.graph_decode(bs * heads)
        t0 = time.perf_counter()
        tables = pt.build_tables(table.row_of, vids, lens)
        torch.cuda.synchronize()
        t1 = time.perf_counter()
        fi.plan_decode(tables, group, d, DT)
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        q = torch.randn(bs * heads, group, d, dtype=DT, device=DEV)
        o = torch.empty_like(q)

        def ours(fi=fi, q=q, o=o, k_rows=k_rows, v_rows=v_rows):
            for layer in range(layers):
                o.copy_(fi.decode(layer, q, k_rows, v_rows, scale))

        ours_ms = cuda_time(ours)
        del table, k_rows, v_rows, keep, ours
        # SGLang's way on full KV: per-layer [tokens, H, D] buffers, one plan per step.
        ws = torch.empty(256 * 1024 * 1024, dtype=torch.uint8, device=DEV)
        tokens = bs * kept
        kb = [torch.randn(tokens + 1, 1, heads, d, dtype=DT, device=DEV) for _ in range(layers)]
        vb = [torch.randn_like(x) for x in kb]
        indptr = torch.arange(0, tokens + 1, kept, dtype=torch.int32, device=DEV)
        indices = torch.randperm(tokens, device=DEV).int() + 1
        last = torch.ones(bs, dtype=torch.int32, device=DEV)
        base = flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            ws, "NHD", backend="fa2", use_cuda_graph=True, use_tensor_cores=group >= 4,
            paged_kv_indptr_buffer=torch.zeros(bs + 1, dtype=torch.int32, device=DEV),
            paged_kv_indices_buffer=torch.zeros(tokens, dtype=torch.int32, device=DEV),
            paged_kv_last_page_len_buffer=torch.zeros(bs, dtype=torch.int32, device=DEV),
        )  # fmt: skip
        t3 = time.perf_counter()
        base.plan(indptr.cpu(), indices, last.cpu(), heads * group, heads, d, 1, q_data_type=DT, kv_data_type=DT)
        torch.cuda.synchronize()
        t4 = time.perf_counter()
        qb = torch.randn(bs, heads * group, d, dtype=DT, device=DEV)
        ob = torch.empty_like(qb)

        def sglang_like(base=base, qb=qb, ob=ob, kb=kb, vb=vb):
            for layer in range(layers):
                ob.copy_(base.run(qb, (kb[layer], vb[layer]), sm_scale=scale))

        base_ms = cuda_time(sglang_like)
        out[f"bs{bs}"] = {
            "ours_attention_ms": round(ours_ms, 4),
            "sglang_flashinfer_ms": round(base_ms, 4),
            "ratio": round(ours_ms / base_ms, 3),
            "within_10pct": ours_ms <= 1.1 * base_ms,
            "ours_build_tables_ms": round((t1 - t0) * 1e3, 3),
            "ours_plan_ms_all_layers": round((t2 - t1) * 1e3, 3),
            "sglang_plan_ms": round((t4 - t3) * 1e3, 3),
        }
        del kb, vb, ws, fi, sglang_like, base
        torch.cuda.empty_cache()
    return out


# -- greedy equivalence on a tiny random model ---------------------------------------------------------------
class TinyLlama:
    """Random weights, Llama-shaped (RMSNorm, RoPE, GQA, SwiGLU); attention supplied per call."""

    def __init__(self, vocab=512, layers=4, heads=2, group=3, d=64, hidden=384, seed=0):
        g = torch.Generator(device="cpu").manual_seed(seed)

        def w(*shape):
            return (torch.randn(*shape, generator=g) / math.sqrt(shape[-1])).to(DEV, DT)

        self.layers, self.heads, self.group, self.d = layers, heads, group, d
        hq = heads * group
        self.embed = (torch.randn(vocab, hidden, generator=g)).to(DEV, DT)
        self.wq = [w(hq * d, hidden) for _ in range(layers)]
        self.wk = [w(heads * d, hidden) for _ in range(layers)]
        self.wv = [w(heads * d, hidden) for _ in range(layers)]
        self.wo = [w(hidden, hq * d) for _ in range(layers)]
        self.up = [w(2 * hidden, hidden) for _ in range(layers)]
        self.down = [w(hidden, hidden) for _ in range(layers)]
        self.head = w(vocab, hidden)

    @staticmethod
    def norm(x):
        x = x.float()
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)).to(DT)

    def rope(self, x, pos):  # x [T, n, d]
        half = self.d // 2
        freq = 1.0 / (10000 ** (torch.arange(half, device=DEV).float() / half))
        ang = pos.float()[:, None] * freq[None]
        cos, sin = ang.cos()[:, None], ang.sin()[:, None]
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(DT)

    def forward(self, tokens, pos, attend):
        """tokens/pos [T]; ``attend(layer, q [T,Hq,d], k [T,H,d], v)`` -> [T, Hq, d]; logits of the last tokens."""
        x = self.embed[tokens]
        for layer in range(self.layers):
            h = self.norm(x)
            q = self.rope((h @ self.wq[layer].T).view(len(tokens), -1, self.d), pos)
            k = self.rope((h @ self.wk[layer].T).view(len(tokens), -1, self.d), pos)
            v = (h @ self.wv[layer].T).view(len(tokens), -1, self.d)
            x = x + attend(layer, q, k, v).reshape(len(tokens), -1) @ self.wo[layer].T
            a, b = (self.norm(x) @ self.up[layer].T).chunk(2, -1)
            x = x + (torch.nn.functional.silu(a) * b) @ self.down[layer].T
        return self.norm(x) @ self.head.T


def _synced_ms(fn, reps=5) -> tuple[float, float]:
    """(host ms until ``fn`` returns, ms until the device is done), medians."""
    host, total = [], []
    for _ in range(reps):
        if not DRY:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if not DRY:
            torch.cuda.synchronize()
        host.append((t1 - t0) * 1e3)
        total.append((time.perf_counter() - t0) * 1e3)
    return round(sorted(host)[len(host) // 2], 3), round(sorted(total)[len(total) // 2], 3)


def _sync_warnings(fn) -> int:
    """Implicit device synchronisations ``fn`` makes (CUDA's sync debug mode)."""
    if DRY:
        return 0
    import warnings

    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@part("host_cost")
def host_cost():
    from bench import host_cost as hc
    from dkv_sglang.policy import PolicyConfig, select_batch

    L, H, budget, group = 32, 8, 128, 4
    out = {"decode": [], "select": []}
    for b in (1, 8, 32, 128, 256):
        w = hc.decode_world(b, L, H, budget, 4096, device=DEV)
        tables = hc.decode_step(w)
        with hc.OpCounter() as c:
            hc.decode_step(w)
        host_ms, device_ms = _synced_ms(lambda: hc.decode_step(w))
        syncs = _sync_warnings(lambda: hc.decode_step(w))
        kernels = TorchPagedKernels() if DRY else FlashInferKernels(L, H, group, 128, DT, DEV, max_rows=w.table.num_rows + 1)
        tables = hc.decode_step(w)
        plan_ms, _ = _synced_ms(lambda: kernels.plan_decode(tables, group, 128, DT))
        out["decode"].append({"batch": b, "ops": c.ops, "sync_ops": c.sync_ops, "cuda_sync_warnings": syncs,
                              "host_ms": host_ms, "device_ms": device_ms, "plan_ms_all_layers": plan_ms})
        print("host_cost decode", out["decode"][-1], flush=True)
    config = PolicyConfig(policy="dynamickv", budget=budget)
    for n in (4096, 16384, 32768):
        for r in (1, 16):
            scores = torch.rand(r, L, H, n - config.window, device=DEV) ** 4
            select_batch(scores, n, config)
            with hc.OpCounter() as c:
                select_batch(scores, n, config)
            host_ms, device_ms = _synced_ms(lambda: select_batch(scores, n, config), reps=3)
            out["select"].append({"tokens": n, "requests": r, "ops": c.ops, "sync_ops": c.sync_ops,
                                  "host_ms": host_ms, "device_ms": device_ms})
            del scores
    return out


def generate_full(model, prompts, steps):
    """Reference: per request, SDPA over a growing full K/V cache."""
    outs = []
    for p in prompts:
        cache = [[None, None] for _ in range(model.layers)]

        def attend(layer, q, k, v, cache=cache):
            ck, cv = cache[layer]
            ck = k if ck is None else torch.cat([ck, k])
            cv = v if cv is None else torch.cat([cv, v])
            cache[layer] = [ck, cv]
            n, t = ck.shape[0], q.shape[0]
            mask = torch.arange(n, device=DEV)[None] <= torch.arange(n - t, n, device=DEV)[:, None]
            o = torch.nn.functional.scaled_dot_product_attention(
                q.transpose(0, 1), ck.transpose(0, 1), cv.transpose(0, 1), attn_mask=mask, enable_gqa=True
            )
            return o.transpose(0, 1)

        tok = torch.tensor(p, device=DEV)
        pos = torch.arange(len(p), device=DEV)
        out = []
        for _ in range(steps):
            nxt = int(model.forward(tok, pos, attend)[-1].argmax())
            out.append(nxt)
            tok, pos = torch.tensor([nxt], device=DEV), pos[-1:] + 1
        outs.append(out)
    return outs


def generate_dkv(model, prompts, steps, budget):
    """Ours: batched, the row-table pool, FlashInfer ragged prefill and per-layer decode; a prompt
    longer than ``budget`` keeps its first 4 and last budget-4 rows (nothing is cut when budget >= n)."""
    heads, d = model.heads, model.d
    table = RowTable(model.layers, heads, sum(map(len, prompts)) + steps * len(prompts) + 8, 4096, device=DEV)
    k_rows = torch.zeros(table.num_rows + 1, d, dtype=DT, device=DEV)
    v_rows = torch.zeros_like(k_rows)
    fi = (
        TorchPagedKernels()
        if DRY
        else FlashInferKernels(model.layers, heads, model.group, d, DT, DEV, table.num_rows + 1)
    )
    ids = [table.alloc(len(p)) for p in prompts]
    lens = [len(p) for p in prompts]
    new = torch.cat(ids)
    scale = d**-0.5

    def store(layer, k, v, vids):
        rows = table.write_rows(layer, vids)
        k_rows[rows] = k.reshape(-1, d)
        v_rows[rows] = v.reshape(-1, d)

    ragged_qo = torch.zeros(len(lens) + 1, dtype=torch.int32)
    ragged_qo[1:] = torch.cumsum(torch.tensor(lens), 0)
    fi.plan_extend(ragged_qo, None, None, heads * model.group, d, DT)

    def attend_prefill(layer, q, k, v):
        store(layer, k, v, new)
        return attend_extend(fi, layer, q, k, v, k_rows, v_rows, scale, None, heads)

    tokens = torch.tensor([t for p in prompts for t in p], device=DEV)
    pos = torch.cat([torch.arange(n, device=DEV) for n in lens])
    logits = model.forward(tokens, pos, attend_prefill)[torch.cumsum(torch.tensor(lens), 0) - 1]
    for vids, n in zip(ids, lens):
        if n > budget:
            keep = torch.zeros(model.layers, heads, n, dtype=torch.bool, device=DEV)
            keep[..., :4] = True
            keep[..., n - (budget - 4) :] = True
            table.drop(vids, keep)
    outs = [[] for _ in prompts]
    for step in range(steps):
        nxt = logits.argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            outs[i].append(t)
        if step == steps - 1:
            break
        step_ids = table.alloc(len(prompts))
        ids = [torch.cat([a, step_ids[i : i + 1]]) for i, a in enumerate(ids)]
        lens = [n + 1 for n in lens]
        tables = pt.build_tables(table.row_of, torch.cat(ids), lens)
        fi.plan_decode(tables, model.group, d, DT)

        def attend_decode(layer, q, k, v, step_ids=step_ids):
            store(layer, k, v, step_ids)
            o = fi.decode(layer, q.reshape(-1, model.group, d), k_rows, v_rows, scale)
            return o.view(q.shape)

        logits = model.forward(nxt, torch.tensor(lens, device=DEV) - 1, attend_decode)
    return outs


@part("greedy")
def greedy():
    model = TinyLlama()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 512, (n,), generator=g).tolist() for n in (400, 230, 150, 60)]
    steps = 24
    full = generate_full(model, prompts, steps)
    ours = generate_dkv(model, prompts, steps, budget=4096)
    same = [a == b for a, b in zip(full, ours)]
    first_diff = [next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), None) for a, b in zip(full, ours)]
    return {"prompts": [len(p) for p in prompts], "steps": steps, "identical": same, "first_difference": first_diff}


if __name__ == "__main__":
    RESULT["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    RESULT["torch"] = torch.__version__
    if DRY:  # the parts that run without FlashInfer (default: greedy)
        for name in sys.argv[1:] or ["greedy"]:
            globals()[name]()
        sys.exit(0)
    try:
        import flashinfer

        RESULT["flashinfer"] = flashinfer.__version__
    except Exception as e:  # noqa: BLE001
        RESULT["flashinfer"] = {"error": repr(e), "trace": traceback.format_exc()[-3000:]}
        save()
        sys.exit(1)
    save()
    parts = sys.argv[1:] or ["correctness", "correctness_page16", "greedy", "decode_speed", "host_cost"]
    for name in parts:
        globals()[name]()
    RESULT["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    save()
