"""Host work of serving, counted: a decode step's metadata and compressing a prefill batch.

On a GPU every ATen op is a kernel launch or a dispatcher call the host pays for, and a *sync op*
makes the host wait for the device (``nonzero``, ``item`` / ``_local_scalar_dense``, boolean-mask
indexing, ``.tolist()`` / ``.cpu()`` / ``.numpy()`` of a tensor). This counts both, with a
``TorchDispatchMode`` on CPU tensors, over the code the server runs:

- decode: :meth:`KeptIndex.append` (the scheduler's hook after ``prepare_for_decode``), then
  :func:`page_table.decode_rows` and :func:`page_table.decode_tables` (what both attention
  backends build once per step), for B requests each keeping ``budget`` rows per (layer, head);
- compress: :func:`compressor.compress_jobs` (choose, cut, index) for R requests of N tokens
  whose window scores are recorded, the way ``compress_batch`` calls it after a prefill batch.

SGLang's host-side lengths (``seq_lens_cpu``, ``req_pool_indices_cpu``) are passed as numpy, as
host bookkeeping; every ``.numpy()`` / ``.tolist()`` / ``.cpu()`` of a torch tensor counts as a
sync. One CPU thread; ``host_ms`` is the median of a few runs (on a GPU the device work of the
same ops is microseconds; what stays is the op count).

    python -m bench.host_cost [--json] [--layers 32] [--kv-heads 8] [--budget 128]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time
from types import SimpleNamespace

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = {"nonzero", "_local_scalar_dense", "item", "masked_select", "is_nonzero", "equal", "unique",
            "_unique2", "masked_scatter"}
HOST_READS = ("tolist", "numpy", "cpu", "item")
DECODE_BATCHES = (1, 8, 32, 128, 256)
SLOTS = 4096  # request slots (SGLang's req_to_token rows) the batch is spread over
COMPRESS_TOKENS = (4096, 16384, 32768)
COMPRESS_REQUESTS = (1, 16)


class OpCounter(TorchDispatchMode):
    """Counts ATen ops and sync ops while active, as if every tensor lived on a GPU but those
    the host made: a tensor read back (``.cpu()``), built from numpy or a Python list
    (``torch.from_numpy``, ``torch.tensor``), or computed only from such tensors is a host tensor,
    and reading it (``.tolist()``, ``int(...)``) costs nothing. A sync op is a read of any other
    tensor (``.cpu()``, ``.tolist()``, ``.numpy()``, ``.item()``, ``_local_scalar_dense``) or a
    data-dependent op on one (``nonzero``, boolean-mask indexing, ...)."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.sync_ops = 0
        self.names: dict[str, int] = {}
        self.syncs: dict[str, int] = {}
        self._host: set[int] = set()
        self._saved = {}

    def _is_host(self, t: torch.Tensor) -> bool:
        return t.untyped_storage().data_ptr() in self._host

    def _mark(self, out) -> None:
        for t in out if isinstance(out, (list, tuple)) else (out,):
            if isinstance(t, torch.Tensor):
                self._host.add(t.untyped_storage().data_ptr())

    def _sync(self, what: str) -> None:
        self.sync_ops += 1
        self.syncs[what] = self.syncs.get(what, 0) + 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name.split("::")[-1]
        tensors = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        host = bool(tensors) and all(self._is_host(t) for t in tensors)
        self.ops += 1
        self.names[name] = self.names.get(name, 0) + 1
        if not host and (name in SYNC_OPS or (name.startswith("index") and _bool_index(args))):
            self._sync(name)
        out = func(*args, **(kwargs or {}))
        if host:
            self._mark(out)
        return out

    def __enter__(self):
        for method in HOST_READS:
            original = getattr(torch.Tensor, method)
            self._saved[(torch.Tensor, method)] = original
            setattr(torch.Tensor, method, self._reading(method, original))
        for method in ("from_numpy", "tensor"):
            original = getattr(torch, method)
            self._saved[(torch, method)] = original
            setattr(torch, method, self._made_on_host(original))
        return super().__enter__()

    def __exit__(self, *exc):
        for (owner, method), original in self._saved.items():
            setattr(owner, method, original)
        return super().__exit__(*exc)

    def _reading(self, method, original):
        counter = self

        def read(tensor, *args, **kwargs):
            if not counter._is_host(tensor):
                counter._sync(method)
            with torch.utils._python_dispatch._disable_current_modes():
                out = original(tensor, *args, **kwargs)
            if method == "cpu":
                counter._mark(out)
            return out

        return read

    def _made_on_host(self, original):
        counter = self

        def make(*args, **kwargs):
            with torch.utils._python_dispatch._disable_current_modes():
                out = original(*args, **kwargs)
            device = kwargs.get("device")
            if device is None or torch.device(device).type == "cpu":
                counter._mark(out)
            return out

        return make


def _bool_index(args) -> bool:
    for a in args:
        if isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in a):
            return True
    return False


def _timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


# -- decode ---------------------------------------------------------------------------------------
def decode_world(batch: int, layers: int, heads: int, budget: int, prompt: int, device="cpu"):
    """B compressed requests, each keeping ``budget`` rows per (layer, head), at ``prompt`` tokens."""
    from dkv_sglang.memory.kept_index import KeptIndex
    from dkv_sglang.memory.row_table import RowTable

    steps = 8
    table = RowTable(layers, heads, batch * (budget + steps) + 8, batch * (budget + steps) + 8, device=device)
    index = KeptIndex(table)
    kept = table.alloc(batch * budget).view(batch, budget)
    rows = table.row_of[:, :, kept].permute(2, 0, 1, 3)  # [B, L, H, budget]
    counts = np.full((batch, layers, heads), budget, dtype=np.int64)
    # spread over SGLang's request slots, as in a server that has run a while
    slots = np.linspace(0, SLOTS - 1, batch).astype(np.int64)
    index.build(slots.tolist(), rows, counts, [prompt] * batch, room=steps)
    req_to_token = torch.zeros(SLOTS + 1, prompt + steps + 1, dtype=torch.int32, device=device)
    return SimpleNamespace(table=table, index=index, slots=slots, seq=prompt, req_to_token=req_to_token)


def decode_step(w, page_size: int = 1):
    """One decode step's metadata, as the server builds it; returns the page tables."""
    from dkv_sglang.attention import page_table as pt

    new = w.table.alloc(len(w.slots))
    w.seq += 1
    seq_lens = np.full(len(w.slots), w.seq, dtype=np.int64)
    w.index.append(w.slots, new, seq_lens)
    step = pt.decode_rows(w.index, w.table.row_of, w.req_to_token, w.slots, seq_lens)
    return pt.decode_tables(step, page_size)


def measure_decode(batch: int, layers: int, heads: int, budget: int, prompt: int = 4096) -> dict:
    w = decode_world(batch, layers, heads, budget, prompt)
    decode_step(w)  # warm
    with OpCounter() as c:
        decode_step(w)
    ms = _timed(lambda: decode_step(w), 5)
    return {"batch": batch, "ops": c.ops, "sync_ops": c.sync_ops, "host_ms": round(ms, 2)}


# -- compression -------------------------------------------------------------------------------------
class _Allocator:
    """What ``compress_jobs`` reads of SGLang's allocator: the row table and its bookkeeping."""

    def __init__(self, table, pool):
        from dkv_sglang.memory.pool import DkvAllocator

        self.table, self._pool, self.freed_since_admission = table, pool, False
        self.requests_compressed, self.recent = 0, []
        self.record = DkvAllocator.record.__get__(self)

    def get_kvcache(self):
        return self._pool


def compress_world(tokens: int, requests: int, layers: int, heads: int, budget: int, seed: int = 0):
    from dkv_sglang.integration.compressor import Job
    from dkv_sglang.memory.kept_index import KeptIndex
    from dkv_sglang.memory.pool import PrefillPlan
    from dkv_sglang.memory.row_table import RowTable
    from dkv_sglang.policy import PolicyConfig

    config = PolicyConfig(policy="dynamickv", budget=budget)
    table = RowTable(layers, heads, requests * tokens + 8, requests * tokens + 8)
    pool = SimpleNamespace(kept=KeptIndex(table, entries=requests))
    req_to_token = torch.zeros(requests + 1, tokens, dtype=torch.int32)
    g = torch.Generator().manual_seed(seed)
    jobs, recorded = [], {}
    for r in range(requests):
        req_to_token[r] = table.alloc(tokens).to(torch.int32)
        scores = torch.rand(layers, heads, tokens - config.window, generator=g) ** 4
        recorded[r] = (tokens, list(scores))
        req = SimpleNamespace(rid=f"r{r}", kv=SimpleNamespace(cache_protected_len=0), output_ids=[1],
                              sampling_params=SimpleNamespace(max_new_tokens=64), customized_info=None)
        jobs.append(Job(req, r, tokens, PrefillPlan(config=config, prompt_len=tokens)))
    return SimpleNamespace(jobs=jobs, recorded=recorded, allocator=_Allocator(table, pool), req_to_token=req_to_token)


def compress(w) -> None:
    from dkv_sglang.integration.compressor import compress_jobs
    from dkv_sglang.policy import LOCAL

    compress_jobs(w.jobs, w.recorded, w.allocator, None, w.req_to_token, LOCAL)


def measure_compress(tokens: int, requests: int, layers: int, heads: int, budget: int) -> dict:
    compress(compress_world(min(tokens, 1024), 1, layers, heads, budget))  # warm
    w = compress_world(tokens, requests, layers, heads, budget)
    with OpCounter() as c:
        compress(w)
    times = []
    for _ in range(3 if tokens * requests <= 65536 else 1):
        w = compress_world(tokens, requests, layers, heads, budget)
        times.append(_timed(lambda: compress(w), 1))
    return {"tokens": tokens, "requests": requests, "ops": c.ops, "sync_ops": c.sync_ops,
            "host_ms": round(statistics.median(times), 1)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.host_cost", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--layers", type=int, default=32, help="L (default 32: an 8B model)")
    p.add_argument("--kv-heads", type=int, default=8, help="KV heads H (default 8)")
    p.add_argument("--budget", type=int, default=128, help="rows kept per (layer, head) (default 128)")
    p.add_argument("--batches", type=int, nargs="+", default=list(DECODE_BATCHES), help="decode batch sizes")
    p.add_argument("--tokens", type=int, nargs="+", default=list(COMPRESS_TOKENS), help="prompt lengths compressed")
    p.add_argument("--requests", type=int, nargs="+", default=list(COMPRESS_REQUESTS),
                   help="requests per compressed prefill batch")
    args = p.parse_args(argv)
    from dkv_sglang import machine

    machine.prepare()  # SGLang's CPU path (the compressor imports SGLang's pool classes)
    torch.set_num_threads(1)
    out = {"decode": [], "compress": []}
    for b in args.batches:
        out["decode"].append(measure_decode(b, args.layers, args.kv_heads, args.budget))
        if not args.json:
            print("decode", out["decode"][-1], flush=True)
    for n in args.tokens:
        for r in args.requests:
            out["compress"].append(measure_compress(n, r, args.layers, args.kv_heads, args.budget))
            if not args.json:
                print("compress", out["compress"][-1], flush=True)
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
