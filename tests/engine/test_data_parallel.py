"""``--dp-size 2`` with a compressing policy: one dkv server, two data-parallel schedulers (each its
own pool and model copy) behind one tokenizer, on SGLang's CPU path.

SGLang's CPU path refuses more ranks than NUMA nodes unless ``SGLANG_CPU_OMP_THREADS_BIND`` gives
each rank its cores (``"0|1"``: one core each here). ``/dkv/stats`` sums the ranks and lists each
under ``dp_ranks``.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from .cluster import Worker, idle
from .conftest import TINY_LAYERS

pytestmark = pytest.mark.engine

BUDGET, L = 32, TINY_LAYERS


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    worker = Worker(["--model-path", tiny_model, "--kv-policy", "dynamickv", "--kv-budget", str(BUDGET),
                     "--dtype", "float32", "--max-total-tokens", "16384", "--dp-size", "2", "--log-level", "warning"],
                    tmp_path_factory.mktemp("dp") / "server.log", env={"SGLANG_CPU_OMP_THREADS_BIND": "0|1"})
    try:
        worker.wait_ready()
        yield worker
        stats = worker.stats()
        assert idle(stats) and all(idle(rank) for rank in stats["dp_ranks"]), stats
    finally:
        worker.kill()


def _generate(url, ids, **sampling):
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True,
                                                  **sampling}}
    return requests.post(url + "/generate", json=body, timeout=300)


def test_both_ranks_compress_and_stats_sum_them(server):
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(rng.randrange(200, 800))] for _ in range(8)]
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda p: _generate(server.url, p), prompts))
    assert all(r.status_code == 200 and len(r.json()["output_ids"]) == 12 for r in outs), [r.text for r in outs]
    assert all(sum(r.json()["meta_info"]["kv_kept_per_layer"]) == BUDGET * L for r in outs)
    stats = server.stats()
    ranks = stats["dp_ranks"]
    assert len(ranks) == 2 and all(rank["requests_compressed"] > 0 for rank in ranks), ranks
    for key in ("requests_compressed", "pool_rows_total", "pool_rows_free", "pool_rows_cached"):
        assert stats[key] == sum(rank[key] for rank in ranks)
    assert stats["requests_compressed"] >= 8
    assert {r["rid"] for r in stats["recent"]} >= {r.json()["meta_info"]["id"] for r in outs}


def test_per_request_policy_on_every_rank(server):
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 40000) for _ in range(300)] for _ in range(4)]
    before = [rank["requests_compressed"] for rank in server.stats()["dp_ranks"]]
    outs = [_generate(server.url, p, custom_params={"kv_policy": "snapkv", "kv_budget": 16}) for p in prompts]
    assert all(r.json()["meta_info"]["kv_kept_per_layer"] == [16] * L for r in outs)
    after = [rank["requests_compressed"] for rank in server.stats()["dp_ranks"]]
    assert all(a > b for a, b in zip(after, before)), (before, after)  # round robin: both ranks served
