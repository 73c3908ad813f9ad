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
    PolicyConfig(policy="dynamickv", budget=24, window=8, pooling="avg", rmax=3, allocation="reference"),
    PolicyConfig(policy="dynamickv", budget=40, window=8, pooling="max", rmax=10, update_interval=3),
    PolicyConfig(policy="dynamickv", budget=16, window=8, fill_surplus=False, update_interval=2),
    PolicyConfig(policy="dynamickv", budget=24, window=8, rmax=3, allocation="normalized"),
    PolicyConfig(policy="dynamickv", budget=40, window=8, rmax=3, allocation="floor"),
    PolicyConfig(policy="dynamickv", budget=40, window=8, rmax=3, allocation="contrast", head_budgets="adaptive"),
    PolicyConfig(policy="dynamickv", budget=24, window=8, rmax=3, allocation="sinks", head_budgets="adaptive"),
    PolicyConfig(policy="dynamickv", budget=24, window=8, rmax=3, head_budgets="adaptive"),
    PolicyConfig(policy="snapkv", budget=24, window=8, head_budgets="adaptive"),
    PolicyConfig(policy="pyramidkv", budget=40, window=8, head_budgets="adaptive"),
    PolicyConfig(policy="dynamickv", budget=40, window=8, rmax=3, head_budgets="shares"),
    PolicyConfig(policy="dynamickv", budget=40, window=8, rmax=3, head_budgets="max"),
    PolicyConfig(policy="snapkv", budget=24, window=8, head_budgets="max"),
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
            results.append((sel.keep_mask(), sel.kept_per_layer, sel.kept_per_head))
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
    cfg = CASES[case]
    single = select(layer_scores(case), N, cfg)
    (mask0, per_layer0, per_head0), (mask1, per_layer1, per_head1) = two_ranks[0][case], two_ranks[1][case]
    assert per_layer0 == per_layer1 and per_head0 == per_head1, "ranks agree"
    assert per_layer0 == single.kept_per_layer, "and agree with one process on all heads"
    assert per_head0 == single.kept_per_head
    if cfg.policy != "snapkv":
        assert len(set(per_layer0)) > 1, "budgets differ by layer: the agreement means something"
    if cfg.head_budgets != "uniform":
        assert any(len(set(layer)) > 1 for layer in per_head0), "heads differ: the agreement means something"
    # each rank keeps exactly the rows the single process keeps for its heads
    assert torch.equal(torch.cat([mask0, mask1], dim=1), single.keep_mask())


def test_a_rank_alone_would_decide_differently():
    """Without the all-reduce, one shard's budgets differ: the collectives are needed."""
    cfg = CASES[0]
    whole = select(layer_scores(0), N, cfg).kept_per_layer
    shard = select([s[: HEADS // 2] for s in layer_scores(0)], N, cfg).kept_per_layer
    assert shard != whole
