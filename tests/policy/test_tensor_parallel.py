"""Tensor parallelism: two CPU processes over torch.distributed (gloo), each holding half of
the KV heads, must decide the same DynamicKV budgets as one process holding all heads."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from dkv_sglang.policy import PolicyConfig, select

LAYERS, HEADS, N = 8, 4, 200
CASES = [
    PolicyConfig(policy="dynamickv", budget=24, window=8, pooling="avg", rmax=3),
    PolicyConfig(policy="dynamickv", budget=40, window=8, pooling="max", rmax=10, update_interval=3),
    PolicyConfig(policy="dynamickv", budget=16, window=8, fill_surplus=False, update_interval=2),
]


def layer_scores(seed: int) -> list[torch.Tensor]:
    """Scores whose peakiness differs by layer and head, so budgets and shards differ."""
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(HEADS, N - 8, generator=g).pow(1 + 6 * torch.rand(HEADS, 1, generator=g)) for _ in range(LAYERS)]


def _rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from dkv_sglang.policy.reduce import DistReducer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        reducer = DistReducer()
        share = HEADS // world
        results = []
        for seed, cfg in enumerate(CASES):
            mine = [s[rank * share : (rank + 1) * share] for s in layer_scores(seed)]
            sel = select(mine, N, cfg, reducer)
            results.append([k.tolist() for k in sel.kept])
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    outs = [str(tmp / f"rank{r}.pt") for r in range(2)]
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, "a rank failed"
    return [torch.load(o) for o in outs]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_ranks_decide_the_single_process_budgets(two_ranks, case):
    single = select(layer_scores(case), N, CASES[case])
    rank0, rank1 = two_ranks[0][case], two_ranks[1][case]
    budgets = [len(layer[0]) for layer in rank0]
    assert budgets == [len(layer[0]) for layer in rank1], "ranks agree"
    assert budgets == single.kept_per_layer, "and agree with one process on all heads"
    assert len(set(budgets)) > 1, "budgets differ by layer: the agreement means something"
    # each rank keeps exactly the rows the single process keeps for its heads
    for layer in range(LAYERS):
        assert rank0[layer] + rank1[layer] == single.kept[layer].tolist()


def test_a_rank_alone_would_decide_differently():
    """Without the all-reduce, one shard's budgets differ: the collectives are needed."""
    cfg = CASES[0]
    whole = select(layer_scores(0), N, cfg).kept_per_layer
    shard = select([s[: HEADS // 2] for s in layer_scores(0)], N, cfg).kept_per_layer
    assert shard != whole
