import subprocess
import sys

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dkv_sglang.policy import PolicyConfig, select
from dkv_sglang.policy.config import ALLOCATIONS, SINKS
from dkv_sglang.policy.dynamickv import fill_surplus, update_budgets, update_points


def test_update_points():
    assert update_points(30, 4) == [3, 7, 11, 15, 19, 23, 27, 29]
    assert update_points(8, 4) == [3, 7]
    assert update_points(3, 4) == [2]


def test_update_budgets_by_hand():
    # 2 layers, 1 head, base 2, total base*L = 4. k = base*H*L' = 4 winners.
    even = torch.tensor([[[9.0, 8.0, 1.0]], [[7.0, 2.0, 0.5]]])
    # winners 9,8 | 7,2 -> counts [2,2] -> c = counts // 2 = [1,1] -> 4*1//2 = [2,2]
    assert update_budgets(even, [3, 3], base=2, num_layers=2, cap=10) == [2, 2]
    skewed = torch.tensor([[[9.0, 8.0, 6.0]], [[1.0, 0.5, 0.2]]])
    # winners 9,8,6 | 1 -> counts [3,1] -> c = [1,0] -> budgets [4,0]; capped at 3
    assert update_budgets(skewed, [3, 3], base=2, num_layers=2, cap=10) == [4, 0]
    assert update_budgets(skewed, [3, 3], base=2, num_layers=2, cap=3) == [3, 0]
    # a layer cut to 1 held row competes with that row only: winners 9 | 1,0.5,0.2
    assert update_budgets(skewed, [1, 3], base=2, num_layers=2, cap=10) == [0, 4]


def test_remainder_goes_to_last_seen_layer():
    s = torch.tensor([[[5.0, 4.0, 3.0]], [[2.9, 2.8, 0.0]], [[2.7, 0.0, 0.0]]])
    # base 2, L=3: total 6, k = 6 of 9: 5,4,3 | 2.9,2.8 | 2.7 -> counts [3,2,1] -> c = [1,0,0]
    # -> budgets [6,0,0] -> remainder 0
    assert update_budgets(s, [3, 3, 3], base=2, num_layers=3, cap=10) == [6, 0, 0]
    # base 1, L=3 (total 3), k=3: 5,4,3 -> counts [3,0,0] -> c [1,0,0] -> [3,0,0]
    assert update_budgets(s, [3, 3, 3], base=1, num_layers=3, cap=10) == [3, 0, 0]
    # base 1 over L=5 layers (2 unseen): total 5 over c [1,0,0] = [5,0,0]
    assert update_budgets(s, [3, 3, 3], base=1, num_layers=5, cap=10) == [5, 0, 0]
    # k = 3 winners 5, 4.5, 4 -> counts [2,1,0] -> c = counts // 3 = [0,0,0]: no signal, so
    # uniform 5 // 3 = 1 each and the remainder 2 to the last seen layer
    s2 = torch.tensor([[[5.0, 4.0]], [[4.5, 3.5]], [[0.0, 0.0]]])
    assert update_budgets(s2, [2, 2, 2], base=1, num_layers=5, cap=10) == [1, 1, 3]


def test_allocations_by_hand():
    # 3 layers seen of 3, 1 head, base 4 (total 12), k = 12 of 15 held rows.
    s = torch.tensor([[[9.0, 8.0, 7.0, 6.0, 5.0]], [[4.9, 4.8, 4.7, 4.6, 4.5]], [[0.3, 0.2, 0.1, 0.0, 0.0]]])
    # winners 5 | 5 | 2 (0.3, 0.2): reference c = counts // 3 = [1, 1, 0] -> [6, 6, 0]
    assert update_budgets(s, [5] * 3, base=4, num_layers=3, cap=10) == [6, 6, 0]
    # proportional: c = [5, 5, 2] -> 12*5//12, 12*5//12, 12*2//12 = [5, 5, 2]
    assert update_budgets(s, [5] * 3, base=4, num_layers=3, cap=10, allocation="proportional") == [5, 5, 2]
    # floor: base // 5 = 0 at base 4 -> as proportional; at base 10 floor 2 each, the other
    # 30 - 6 = 24 proportional to the winners of k = 30 (all 15 held rows): [5, 5, 5] -> [10, 10, 10]
    assert update_budgets(s, [5] * 3, base=4, num_layers=3, cap=10, allocation="floor") == [5, 5, 2]
    assert update_budgets(s, [5] * 3, base=10, num_layers=3, cap=9, allocation="floor") == [9, 9, 9]
    skew = torch.tensor([[[9.0, 8.0, 7.0, 6.0, 5.0]], [[0.3, 0.2, 0.1, 0.0, 0.0]]])
    # base 10, 2 layers: k = 20 > 10 held rows, everything wins: counts [5, 5]
    # floor 2 each, 16 shared [8, 8] -> [10, 10]; capped at 9
    assert update_budgets(skew, [5, 5], base=10, num_layers=2, cap=9, allocation="floor") == [9, 9]
    # base 5: k = 10 winners, all rows again (5 | 5 incl. the zeros) -> floor 1, [4, 4] + 1
    assert update_budgets(skew, [5, 5], base=5, num_layers=2, cap=9, allocation="floor") == [5, 5]
    # base 2, 2 layers: k = 4 -> winners 4 | 0; floor 0 -> proportional [4, 0]
    assert update_budgets(skew, [5, 5], base=2, num_layers=2, cap=9, allocation="floor") == [4, 0]


def test_normalized_allocation_compares_layers_by_their_own_shares():
    # Layer 0's mass is 10x layer 1's, in the same shape: raw scores give every winner to layer 0,
    # shares split them evenly.
    cfg = PolicyConfig(policy="dynamickv", budget=3, window=1, kernel=1, rmax=3, update_interval=1,
                       allocation="proportional", fill_surplus=False)
    l1 = torch.tensor([[0.4, 0.3, 0.2, 0.1, 0.0, 0.0]])
    scores = [10 * l1, l1]
    assert select(scores, 7, cfg).kept_per_layer == [5, 1]
    norm = PolicyConfig(**{**cfg.__dict__, "allocation": "normalized"})
    assert select(scores, 7, norm).kept_per_layer == [3, 3]


def test_contrast_allocation_funds_the_layer_whose_rows_stand_out():
    # Layer 0 attends flatly (every row about the same), layer 1 to three rows only. In raw mass
    # the flat layer's rows beat the peaked layer's (1.0-0.95 > 0.945), so it wins the whole count;
    # divided by each head's median (0.94 and 0.001) the peaked layer's three rows (x ~940) win first.
    flat = torch.tensor([[1.0 - 0.01 * i for i in range(12)]])
    peaked = torch.tensor([[0.945, 0.935, 0.925] + [0.001] * 9])
    cfg = PolicyConfig(policy="dynamickv", budget=4, window=1, kernel=1, rmax=10, update_interval=2,
                       allocation="proportional", fill_surplus=False)
    assert select([flat, peaked], 13, cfg).kept_per_layer == [7, 1]  # 6 + the window | the window
    contrast = select([flat, peaked], 13, PolicyConfig(**{**cfg.__dict__, "allocation": "contrast"}))
    # k = 6: the peaked layer's 3 rows, then the flat layer's best 3 (1.0/0.94, 0.99/0.94, ...)
    assert contrast.kept_per_layer == [4, 4]
    assert contrast.kept[1].tolist() == [[0, 1, 2, 12]]
    # a head whose median row is 0: its background is 1e-6 of its mean, so its near-zero rows
    # (1e-9) do not become infinitely contrasted winners (they would take all 6: [1, 7])
    zeros = torch.tensor([[0.9, 0.8] + [1e-9] * 4 + [0.0] * 6])
    assert select([flat, zeros], 13, PolicyConfig(**{**cfg.__dict__, "allocation": "contrast"})).kept_per_layer == [5, 3]


def test_sinks_allocation_keeps_the_sinks_everywhere_and_counts_the_rest():
    # Layer 0 attends to its sinks (positions 0-3), layer 1 reads positions 4-19 and ignores the sinks.
    l0 = torch.tensor([[10.0] * 4 + [0.1] * 16])
    l1 = torch.tensor([[0.0] * 4 + [0.5 - 0.01 * i for i in range(16)]])
    cfg = PolicyConfig(policy="dynamickv", budget=9, window=1, kernel=1, rmax=10, update_interval=2,
                       allocation="reference")
    # reference: k = 16 winners, l0's 4 sinks and l1's best 12 -> c = [2, 6] -> budgets [4, 12]
    ref = select([l0, l1], 21, cfg)
    assert ref.kept[0].tolist() == [[0, 1, 2, 3, 20]] and ref.kept[1].tolist() == [[*range(4, 16), 20]]
    # sinks: the sinks win nothing, so l1 takes all 16 -> c = [0, 8]; every layer keeps its 4
    # sinks, and the other 16 - 2 * 4 = 8 rows go by c -> budgets [4, 12] of which 4 are sinks
    sinks = select([l0, l1], 21, PolicyConfig(**{**cfg.__dict__, "allocation": "sinks"}))
    assert sinks.kept[0].tolist() == [[0, 1, 2, 3, 20]] and sinks.kept[1].tolist() == [[*range(0, 12), 20]]


def test_fill_surplus_goes_to_layers_with_room_most_budgeted_first():
    assert fill_surplus([5, 0, 2], budgets=[8, 0, 2], limit=5, total=10) == [5, 0, 5]
    assert fill_surplus([5, 0, 2], budgets=[8, 3, 2], limit=5, total=10) == [5, 3, 2]
    assert fill_surplus([1, 1], budgets=[1, 1], limit=5, total=2) == [1, 1]


def test_select_by_hand():
    # L=2, H=1, window 1, base 2 (budget 3), kernel 1 (no smoothing), rmax 2, m=1, n=7.
    cfg = PolicyConfig(policy="dynamickv", budget=3, window=1, kernel=1, rmax=2, update_interval=1,
                       allocation="reference")
    l0 = torch.tensor([[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])
    l1 = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    sel = select([l0, l1], 7, cfg)
    # bs = min(2*2, 6) = 4; after layer 0 budget [4]; after layer 1 the top-4 of the held
    # {6,5,4,3 | .6,.5,.4,.3} are all layer 0 -> counts [4,0] -> c [2,0] -> budgets [4,0].
    assert sel.kept_per_layer == [5, 1]
    assert sel.kept[0].tolist() == [[0, 1, 2, 3, 6]]
    assert sel.kept[1].tolist() == [[6]]
    mask = sel.keep_mask()
    assert mask.shape == (2, 1, 7) and int(mask.sum()) == 6


def test_short_prompt_is_kept_whole():
    cfg = PolicyConfig(policy="dynamickv", budget=16)
    assert select([torch.rand(2, 8)] * 3, 16, cfg) is None


@st.composite
def cases(draw):
    layers = draw(st.integers(1, 8))
    heads = draw(st.integers(1, 3))
    window = draw(st.integers(1, 6))
    budget = draw(st.integers(window + 1, 40))
    n = draw(st.integers(budget + 1, 160))
    cfg = PolicyConfig(
        policy="dynamickv",
        budget=budget,
        window=window,
        kernel=draw(st.sampled_from([1, 3, 7])),
        pooling=draw(st.sampled_from(["avg", "max"])),
        rmax=draw(st.integers(1, 10)),
        update_interval=draw(st.integers(1, 5)),
        allocation=draw(st.sampled_from(ALLOCATIONS)),
    )
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    scores = [torch.rand(heads, n - window, generator=g) for _ in range(layers)]
    return cfg, scores, n


@settings(max_examples=200, deadline=None)
@given(cases())
def test_properties(case):
    cfg, scores, n = case
    sel = select(scores, n, cfg)
    L, H = len(scores), scores[0].shape[0]
    assert sel is not None and len(sel.kept) == L
    # exactly budget*L rows, each layer within its prompt, the window always kept
    assert sum(sel.kept_per_layer) == cfg.budget * L
    window = set(range(n - cfg.window, n))
    for pos in sel.kept:
        assert pos.shape[0] == H and cfg.window <= pos.shape[1] <= n
        for head in pos.tolist():
            assert head == sorted(set(head)), "positions unique and ascending"
            assert window <= set(head) and 0 <= head[0] and head[-1] < n
    if cfg.allocation == "sinks":  # every head of every layer keeps the sinks its budget allows
        sinks = set(range(min(SINKS, cfg.base)))
        assert all(sinks <= set(head) for pos in sel.kept for head in pos.tolist())
    # deterministic
    again = select([s.clone() for s in scores], n, cfg)
    assert all(torch.equal(a, b) for a, b in zip(sel.kept, again.kept))
    # the reference (no surplus filling) keeps a subset of ours, never more than budget*L
    ref = select(scores, n, PolicyConfig(**{**cfg.__dict__, "fill_surplus": False}))
    assert sum(ref.kept_per_layer) <= cfg.budget * L
    for ours, theirs in zip(sel.kept, ref.kept):
        for a, b in zip(ours.tolist(), theirs.tolist()):
            assert set(b) <= set(a)


def test_policy_code_imports_no_sglang():
    code = "import sys, dkv_sglang.policy, dkv_sglang.memory.row_table; print(any(m.startswith('sglang') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
