import pytest
import torch

from dkv_sglang.policy import POLICIES, PolicyConfig, select
from dkv_sglang.policy.baselines import pyramid_budgets


def cfg(policy, **kw):
    return PolicyConfig(policy=policy, **{"budget": 12, "window": 2, "kernel": 1, **kw})


def test_streamingllm_keeps_sinks_and_recent():
    sel = select([torch.rand(2, 18)] * 3, 20, cfg("streamingllm"))
    expected = [0, 1, 2, 3] + list(range(12, 20))
    assert all(k.tolist() == [expected, expected] for k in sel.kept)


def test_snapkv_keeps_top_prefix_per_head_plus_window():
    s = torch.tensor([[9.0, 0, 8, 0, 7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1, 0],
                      [0, 9.0, 0, 8, 0, 7, 0, 6, 0, 5, 0, 4, 0, 3, 0, 2, 0, 1]])
    sel = select([s, s], 20, cfg("snapkv", budget=11))  # base 9 -> top-9 per head
    assert sel.kept[0].tolist() == [list(range(0, 18, 2)) + [18, 19], list(range(1, 18, 2)) + [18, 19]]
    assert sel.kept_per_layer == [11, 11]


def test_pyramid_budgets_decrease_and_sum():
    b = pyramid_budgets(8, base=40, cap=1000)
    assert sum(b) == 320 and b == sorted(b, reverse=True) and b[0] > 2 * b[-1]
    assert pyramid_budgets(1, 40, 1000) == [40]
    capped = pyramid_budgets(4, base=40, cap=50)
    assert sum(capped) == 160 and max(capped) == 50


@pytest.mark.parametrize("policy", [p for p in POLICIES if p != "full"])
def test_every_policy_keeps_exactly_budget_per_layer_on_average(policy):
    g = torch.Generator().manual_seed(1)
    scores = [torch.rand(3, 90, generator=g) for _ in range(6)]
    sel = select(scores, 98, PolicyConfig(policy=policy, budget=24))
    assert sum(sel.kept_per_layer) == 24 * 6
    for pos in sel.kept:
        assert pos.shape[0] == 3 and set(range(90, 98)) <= set(pos[0].tolist())
    assert select(scores[:1], 24, PolicyConfig(policy=policy, budget=24)) is None
