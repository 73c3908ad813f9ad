"""The batched selection (``choose`` / ``select_batch``) keeps, row for row, what the policy code
kept before it was batched (tests/policy/_legacy.py, one request and one layer at a time), and
does it in a fixed number of tensor ops per batch with no host sync.

Ties decide rows often (max pooling makes plateaus, quantised scores repeat), so many cases
here are tie-heavy: a tie broken differently changes the rows kept.
"""

from __future__ import annotations

import socket
from collections import Counter

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

from dkv_sglang.policy import PolicyConfig, choose, keep_masks, pool_scores, select, select_batch
from dkv_sglang.policy.config import ALLOCATIONS, HEAD_BUDGETS
from dkv_sglang.policy.ranking import top_rows

from . import _legacy

SCORE_KINDS = ("continuous", "quantized", "integer", "peaked")


def random_scores(g: torch.Generator, kind: str, shape) -> torch.Tensor:
    x = torch.rand(*shape, generator=g)
    if kind == "quantized":  # a few distinct values: ties everywhere
        return x.round(decimals=1)
    if kind == "integer":
        return (x * 4).floor()
    if kind == "peaked":  # heads and layers of different peakiness (as the TP test's)
        return x.pow(1 + 6 * torch.rand(*shape[:-1], 1, generator=g))
    return x


def random_case(seed: int, policy: str, allocation: str, heads_mode: str):
    g = torch.Generator().manual_seed(seed)

    def pick(options):
        return options[int(torch.randint(len(options), (1,), generator=g))]

    window = pick([1, 2, 4, 8])
    budget = pick([window + 1, window + 3, 16, 24, 40])
    budget = max(budget, window + 1)
    n = budget + pick([1, 5, 30, 90, 200])
    cfg = PolicyConfig(
        policy=policy, budget=budget, window=window, kernel=pick([1, 3, 7]), pooling=pick(["avg", "max"]),
        rmax=pick([1, 2, 3, 10]), update_interval=pick([1, 2, 3, 4]), fill_surplus=pick([True, False]),
        allocation=allocation, head_budgets=heads_mode,
    )
    requests, layers, heads = pick([1, 3]), pick([1, 2, 5, 8]), pick([1, 2, 3, 4])
    scores = random_scores(g, pick(SCORE_KINDS), (requests, layers, heads, n - window))
    return cfg, scores, n


def assert_same_as_legacy(cfg: PolicyConfig, scores: torch.Tensor, n: int) -> None:
    positions, counts = choose(scores, n, cfg)
    batch = select_batch(scores, n, cfg)
    assert positions.shape[:3] == scores.shape[:3] and counts.shape == scores.shape[:3]
    masks = keep_masks(positions, n)
    for r in range(scores.shape[0]):
        old = _legacy.select(list(scores[r]), n, cfg)
        new = batch[r]
        assert [k.tolist() for k in new.kept] == [k.tolist() for k in old.kept], cfg
        assert new.counts.tolist() == old.counts.tolist() == counts[r].tolist()
        assert new.kept_per_layer == old.kept_per_layer and new.kept_per_head == old.kept_per_head
        for layer, kept in enumerate(old.kept):  # the padded row: the same rows, then n - 1
            assert positions[r, layer, :, : kept.shape[1]].tolist() == kept.tolist()
            assert (positions[r, layer, :, kept.shape[1] :] == n - 1).all()
        assert torch.equal(new.keep_mask(), old.keep_mask()) and torch.equal(masks[r], old.keep_mask())
        one = select(list(scores[r]), n, cfg)
        assert [k.tolist() for k in one.kept] == [k.tolist() for k in old.kept]


@pytest.mark.parametrize("heads_mode", HEAD_BUDGETS)
@pytest.mark.parametrize("allocation", ALLOCATIONS)
def test_dynamickv_keeps_the_legacy_rows(allocation, heads_mode):
    for seed in range(8):
        assert_same_as_legacy(*random_case(seed, "dynamickv", allocation, heads_mode))


@pytest.mark.parametrize("heads_mode", HEAD_BUDGETS)
@pytest.mark.parametrize("policy", ["snapkv", "pyramidkv", "streamingllm"])
def test_baselines_keep_the_legacy_rows(policy, heads_mode):
    for seed in range(12):
        assert_same_as_legacy(*random_case(100 + seed, policy, "contrast", heads_mode))


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_long_plateaus_and_the_sinks_allocation(pooling):
    # a constant head (one long plateau), a zero head and a head with one loud row, in every layer
    n, window = 300, 8
    row = torch.full((3, n - window), 0.5)
    row[1] = 0.0
    row[2, 17] = 9.0
    scores = torch.stack([row * (1 + layer % 2) for layer in range(6)])[None].expand(2, -1, -1, -1).clone()
    for allocation in ALLOCATIONS:
        for heads_mode in HEAD_BUDGETS:
            cfg = PolicyConfig(policy="dynamickv", budget=24, window=window, pooling=pooling, rmax=3,
                               update_interval=2, allocation=allocation, head_budgets=heads_mode)
            assert_same_as_legacy(cfg, scores, n)


def test_top_rows_is_the_stable_sorts_prefix():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 50, generator=g).round()
    x[0, :10] = float("inf")
    x[1, 5:20] = float("-inf")
    x[2] = -0.0
    x[2, ::3] = 0.0
    values, order = top_rows(x, 20)
    ranked, expected = x.sort(dim=-1, descending=True, stable=True)
    assert torch.equal(order, expected[:, :20]) and torch.equal(values, ranked[:, :20])


def test_half_precision_scores_choose_as_their_float32_copy():
    g = torch.Generator().manual_seed(1)
    scores = torch.rand(2, 3, 2, 120, generator=g).to(torch.bfloat16)
    cfg = PolicyConfig(policy="dynamickv", budget=24, rmax=3, head_budgets="adaptive")
    for a, b in zip(choose(scores, 128, cfg), choose(scores.float(), 128, cfg)):
        assert torch.equal(a, b)


class OpCounter(TorchDispatchMode):
    """Counts every ATen op, and the ones that would make a host wait for a GPU."""

    SYNC = ("nonzero", "_local_scalar_dense", "item", "masked_select", "unique", "to_list")

    def __init__(self):
        super().__init__()
        self.ops = Counter()
        self.syncs = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] += 1
        bool_index = name == "index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []))
        to_host = name in ("_to_copy", "to", "copy_") and str(kwargs.get("device", "")) == "cpu"
        if any(s in name for s in self.SYNC) or bool_index or to_host:
            self.syncs[name] += 1
        return func(*args, **kwargs)


def count_ops(cfg: PolicyConfig, requests: int, n: int, layers: int = 8, heads: int = 4) -> OpCounter:
    scores = torch.rand(requests, layers, heads, n - cfg.window, generator=torch.Generator().manual_seed(n))
    with OpCounter() as counter:
        choose(scores, n, cfg)
    return counter


CONFIGS = [
    PolicyConfig(policy="dynamickv", budget=128),
    PolicyConfig(policy="dynamickv", budget=128, allocation="sinks", head_budgets="max"),
    PolicyConfig(policy="dynamickv", budget=128, allocation="normalized", head_budgets="adaptive", fill_surplus=False),
    PolicyConfig(policy="snapkv", budget=128, head_budgets="shares"),
    PolicyConfig(policy="pyramidkv", budget=128),
    PolicyConfig(policy="streamingllm", budget=128),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.policy}-{c.allocation}-{c.head_budgets}")
def test_choose_costs_the_same_ops_whatever_the_prompt_or_batch_and_never_syncs(cfg):
    one_short, one_long, many = count_ops(cfg, 1, 512), count_ops(cfg, 1, 4096), count_ops(cfg, 16, 512)
    assert sum(one_short.ops.values()) == sum(one_long.ops.values()) == sum(many.ops.values()), (
        one_short.ops, one_long.ops, many.ops)
    assert not (one_short.syncs or one_long.syncs or many.syncs)
    # on the meta device any read of the data raises: choose reads none
    positions, counts = choose(torch.empty(3, 8, 4, 512 - cfg.window, device="meta"), 512, cfg)
    assert positions.device.type == counts.device.type == "meta"


def test_select_batch_costs_the_same_ops_for_one_request_or_many():
    cfg = PolicyConfig(policy="dynamickv", budget=128, head_budgets="adaptive")
    counters = []
    for requests in (1, 5):
        with OpCounter() as counter:
            select_batch(torch.rand(requests, 8, 4, 1000), 1008, cfg)
        counters.append(counter)
    assert sum(counters[0].ops.values()) == sum(counters[1].ops.values())
    assert not counters[1].syncs  # its one host read (.cpu() of the counts) is no op on a CPU tensor


# Tensor parallelism, batched: two gloo ranks, each half of the heads of three requests at once.
TP_LAYERS, TP_HEADS, TP_N = 6, 4, 160
TP_CASES = [
    PolicyConfig(policy="dynamickv", budget=24, window=8, rmax=3, allocation="reference"),
    PolicyConfig(policy="dynamickv", budget=40, window=8, rmax=3, head_budgets="max", pooling="max"),
    PolicyConfig(policy="dynamickv", budget=24, window=8, rmax=3, allocation="normalized", head_budgets="adaptive"),
    PolicyConfig(policy="dynamickv", budget=24, window=8, rmax=3, allocation="sinks", head_budgets="shares"),
    PolicyConfig(policy="snapkv", budget=24, window=8, head_budgets="max"),
    PolicyConfig(policy="pyramidkv", budget=40, window=8, head_budgets="adaptive"),
]


def tp_scores(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    kind = SCORE_KINDS[seed % len(SCORE_KINDS)]
    return random_scores(g, kind, (3, TP_LAYERS, TP_HEADS, TP_N - 8))


def _tp_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from dkv_sglang.policy.reduce import DistReducer

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        reducer = DistReducer()
        share = TP_HEADS // world
        results = []
        for seed, cfg in enumerate(TP_CASES):
            mine = tp_scores(seed)[:, :, rank * share : (rank + 1) * share]
            results.append([(s.keep_mask(), s.kept_per_layer, s.kept_per_head)
                            for s in select_batch(mine, TP_N, cfg, reducer)])
        torch.save(results, out)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tensor_parallel_batches_keep_the_legacy_rows(tmp_path):
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_tp_rank, args=(r, 2, port, outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0, "a rank failed"
    ranks = [torch.load(o) for o in outs]
    for seed, cfg in enumerate(TP_CASES):
        scores = tp_scores(seed)
        for r in range(scores.shape[0]):
            old = _legacy.select(list(scores[r]), TP_N, cfg)
            (mask0, layer0, head0), (mask1, layer1, head1) = ranks[0][seed][r], ranks[1][seed][r]
            assert layer0 == layer1 == old.kept_per_layer and head0 == head1 == old.kept_per_head, cfg
            assert torch.equal(torch.cat([mask0, mask1], dim=1), old.keep_mask()), cfg


@pytest.mark.parametrize("kernel", [1, 3, 7, 9])
def test_avg_pooling_is_avg_pool1d_bit_for_bit(kernel):
    g = torch.Generator().manual_seed(kernel)
    for length in (1, 2, kernel, 50, 333):
        for x in (torch.rand(5, length, generator=g), torch.randn(2, 3, length, generator=g) * 1e4,
                  torch.rand(4, length, generator=g).pow(9)):
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                y = x.to(dtype)
                assert torch.equal(pool_scores(y, kernel, "avg"), _legacy.pool_scores(y, kernel, "avg"))
