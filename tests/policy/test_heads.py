"""Adaptive per-head budgets (Ada-KV's allocation inside a layer)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dkv_sglang.policy import PolicyConfig, select
from dkv_sglang.policy.heads import ALPHA, adaptive_counts, larger_counts, ragged_kept


def test_adaptive_counts_by_hand():
    # 2 heads, 10 rows per head: floor 2 each, the other 16 by one top-k over the rest.
    peaked = torch.tensor([9.0, 8.0] + [0.0] * 18)
    spread = torch.linspace(1.0, 0.05, 20)
    ranked = torch.stack([peaked, spread])
    counts = adaptive_counts(ranked, 10)
    # the peaked head's rest is all zeros; the spread head's 18 remaining scores are all > 0,
    # so 16 of them win: [2, 2 + 16]
    assert counts.tolist() == [2, 18]
    assert int(counts.sum()) == 20
    # rows tying the k-th score go to the earlier head (as DynamicKV's ties go to the earlier layer)
    flat = torch.ones(2, 5)
    assert adaptive_counts(flat, 3).tolist() == [5, 1]
    # k = 4 of 2,1,1 | 2,1,1: both 2s win, then 2 of the four tied 1s, head 0's first
    assert adaptive_counts(torch.tensor([[2.0, 1.0, 1.0], [2.0, 1.0, 1.0]]), 2).tolist() == [3, 1]
    # k = 10 of 5 + 5 rows at 10 per head (floor 2): every row wins
    assert adaptive_counts(torch.tensor([[3.0, 2.0, 1.0, 1.0, 0.0]] * 2), 5).tolist() == [5, 5]
    with pytest.raises(ValueError):
        adaptive_counts(flat, 6)


def test_ragged_kept_pads_with_the_last_position():
    order = torch.tensor([[4, 0, 2, 1], [3, 1, 0, 2]])
    kept = ragged_kept(order, torch.tensor([3, 1]), n=8, window=2)
    assert kept.tolist() == [[0, 2, 4, 6, 7], [3, 6, 7, 7, 7]]
    mask = torch.zeros(2, 8, dtype=torch.bool).scatter_(1, kept, True)
    assert mask.sum(dim=1).tolist() == [5, 3]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.integers(1, 30), st.integers(0, 40), st.integers(0, 2**31 - 1))
def test_adaptive_counts_properties(heads, per_head, extra, seed):
    g = torch.Generator().manual_seed(seed)
    ranked = torch.rand(heads, per_head + extra, generator=g).round(decimals=1).sort(dim=1, descending=True).values
    counts = adaptive_counts(ranked, per_head)
    assert int(counts.sum()) == heads * per_head
    assert int(counts.min()) >= int(ALPHA * per_head) and int(counts.max()) <= per_head + extra


# Heads compete on their scores relative to their own median row, whatever the policy or
# allocation: the head whose few rows stand far above the rest (head 0) gets the most rows, not
# the head that spreads its attention (head 2), which would win on raw mass.
@pytest.mark.parametrize("policy, allocation", [
    ("dynamickv", "floor"), ("dynamickv", "contrast"), ("dynamickv", "reference"), ("snapkv", "floor"),
    ("pyramidkv", "floor")])
def test_adaptive_heads_keep_the_same_total_in_unequal_heads(policy, allocation):
    g = torch.Generator().manual_seed(3)
    # head 0 attends to a few tokens, head 2 spreads its attention
    scores = [torch.rand(3, 190, generator=g).pow(torch.tensor([[12.0], [3.0], [0.5]])) for _ in range(6)]
    cfg = PolicyConfig(policy=policy, budget=40, allocation=allocation, head_budgets="adaptive")
    sel = select(scores, 198, cfg)
    uniform = select(scores, 198, PolicyConfig(policy=policy, budget=40, allocation=allocation))
    assert sel.kept_per_layer == uniform.kept_per_layer, "each layer's budget is unchanged"
    mask = sel.keep_mask()
    assert mask.sum(dim=2).tolist() == sel.counts.tolist() == sel.kept_per_head
    assert int(mask.sum()) == 40 * 6 * 3
    assert mask[:, :, -cfg.window:].all(), "every head keeps the window"
    per_head = sel.counts.sum(dim=0).tolist()
    assert per_head[0] > max(per_head[1:]), per_head
    assert min(min(layer) for layer in sel.kept_per_head) < 40 < max(max(layer) for layer in sel.kept_per_head)


@pytest.mark.parametrize("heads", ["adaptive", "shares", "max"])
@pytest.mark.parametrize("policy", ["snapkv", "dynamickv"])
def test_a_sink_head_keeps_rows_that_stand_out_from_its_own_background(policy, heads):
    # Head 0 pours most of the window's attention into a sink (position 0); a needle (10-16)
    # stands 1000x above its background but is small in raw mass. Head 1 spreads its attention
    # evenly. On raw mass head 1's every row beats the needle, and head 0 keeps only its floor.
    n, window, budget = 208, 8, 24
    head0 = torch.full((n - window,), 1e-5)
    head0[0], head0[10:17] = 7.0, 0.01
    head1 = torch.full((n - window,), 0.04)
    scores = [torch.stack([head0, head1])] * 2
    cfg = PolicyConfig(policy=policy, budget=budget, window=window, head_budgets=heads, pooling="max", kernel=1)
    sel = select(scores, n, cfg)
    mask = sel.keep_mask()
    assert mask[:, 0, 10:17].all(), "the needle stays in the sink head"
    assert mask[:, 0, 0].all() and int(mask.sum()) == budget * 2 * 2


@pytest.mark.parametrize("policy, allocation", [("snapkv", "floor"), ("pyramidkv", "floor"), ("dynamickv", "contrast")])
def test_adaptive_heads_ignore_how_loud_each_head_is(policy, allocation):
    # Scaling one head's scores (by powers of two, exact in floats) changes no head's contrast, so
    # it changes nothing kept; on raw mass the loud head would take the quiet ones' rows.
    g = torch.Generator().manual_seed(5)
    scores = [torch.rand(3, 150, generator=g).pow(3) for _ in range(4)]
    loud = [s * torch.tensor([[2.0**10], [1.0], [2.0**-10]]) for s in scores]
    cfg = PolicyConfig(policy=policy, budget=30, allocation=allocation, head_budgets="adaptive")
    sel = select(scores, 158, cfg)
    assert torch.equal(sel.keep_mask(), select(loud, 158, cfg).keep_mask())
    assert len(set(sel.counts[:, 0].tolist() + sel.counts[:, 2].tolist())) > 1, "heads keep unequal rows"


@pytest.mark.parametrize("policy", ["snapkv", "dynamickv"])
def test_shares_give_a_spread_head_more_rows_than_contrast_does(policy):
    # Head 0's attention has a steep tail, head 1's is spread. Contrast divides by the median,
    # which a steep tail keeps low, so head 0's middling rows outbid head 1's; shares divide by
    # the head's mass, the same for both, so head 1 gets back some of those rows.
    g = torch.Generator().manual_seed(11)
    scores = [torch.rand(2, 240, generator=g).pow(torch.tensor([[3.0], [1.0]])) for _ in range(4)]
    counts = {heads: select(scores, 248, PolicyConfig(policy=policy, budget=40, head_budgets=heads, pooling="max",
                                                      kernel=1)).counts.sum(dim=0)
              for heads in ("shares", "adaptive", "uniform")}
    assert counts["adaptive"][1] < counts["shares"][1] < counts["uniform"][1], counts
    assert counts["shares"].sum() == counts["adaptive"].sum() == counts["uniform"].sum()


def test_larger_counts_by_hand():
    # 3 heads, 10 rows each (floor 2): contrast funds head 0, shares heads 1 and 2. The larger
    # counts [22, 14, 14] are 20, 12, 12 above the floor; the 24 rows above the floor go 480/44,
    # 288/44, 288/44 = 10 r40, 6 r24, 6 r24, and the 2 left to the largest remainders, head 1
    # before head 2 on the tie.
    contrast, shares = torch.tensor([22, 4, 4]), torch.tensor([2, 14, 14])
    assert larger_counts([contrast, shares], 10).tolist() == [13, 9, 8]
    assert larger_counts([shares, contrast], 10).tolist() == [13, 9, 8], "the order of the rules does not matter"
    assert larger_counts([contrast, contrast], 10).tolist() == [22, 4, 4], "where the rules agree, their counts"
    assert larger_counts([torch.tensor([2, 2]), torch.tensor([2, 2])], 2).tolist() == [2, 2]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 6), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_larger_counts_properties(heads, per_head, seed):
    g = torch.Generator().manual_seed(seed)
    floor = int(ALPHA * per_head)

    def split():  # counts of a rule: each at least the floor, summing to heads x per_head
        extra = torch.multinomial(torch.ones(heads), (per_head - floor) * heads, replacement=True, generator=g)
        return floor + torch.bincount(extra, minlength=heads)

    rules = [split(), split()]
    counts = larger_counts(rules, per_head)
    assert int(counts.sum()) == heads * per_head
    assert (counts >= floor).all() and (counts <= torch.stack(rules).amax(dim=0)).all()
    if heads == 2:  # with two heads each count lies between the rules'
        assert (counts >= torch.stack(rules).amin(dim=0)).all()


@pytest.mark.parametrize("policy", ["snapkv", "dynamickv"])
def test_max_funds_the_head_either_rule_funds(policy):
    # The scores of the shares test: contrast funds head 0 and starves head 1, shares the reverse.
    # max gives each head the larger of the two counts, scaled to the same total, so each head
    # keeps more than the rule that starves it gives, and less than the rule that funds it.
    g = torch.Generator().manual_seed(11)
    scores = [torch.rand(2, 240, generator=g).pow(torch.tensor([[3.0], [1.0]])) for _ in range(4)]
    counts = {heads: select(scores, 248, PolicyConfig(policy=policy, budget=40, head_budgets=heads, pooling="max",
                                                      kernel=1)).counts
              for heads in ("shares", "adaptive", "max")}
    low, high = torch.minimum(counts["adaptive"], counts["shares"]), torch.maximum(counts["adaptive"], counts["shares"])
    assert ((low <= counts["max"]) & (counts["max"] <= high)).all(), counts
    assert ((low < counts["max"]) & (counts["max"] < high)).any(), "strictly between where the rules differ"
    assert counts["max"].sum() == counts["adaptive"].sum()


def test_streamingllm_ignores_head_budgets():
    scores = [torch.rand(2, 90)] * 3
    a = select(scores, 98, PolicyConfig(policy="streamingllm", budget=24, head_budgets="adaptive"))
    b = select(scores, 98, PolicyConfig(policy="streamingllm", budget=24))
    assert torch.equal(a.keep_mask(), b.keep_mask())
