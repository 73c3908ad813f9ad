"""The compact kept-row index decode reads: the same rows the row table holds, without
looking up the whole sequence."""

import pytest
import torch

from dkv_sglang.memory.kept_index import KeptIndex
from dkv_sglang.memory.row_table import RowTable


def compressed(seed=0, n=40, layers=3, heads=2, counts=((5, 5), (12, 12), (3, 3))):
    """A request whose (layer, head)s keep ``counts[layer][head]`` tokens each, chosen at random."""
    g = torch.Generator().manual_seed(seed)
    t = RowTable(layers, heads, 200, 800)
    vids = t.alloc(n)
    keep = torch.zeros(layers, heads, n, dtype=torch.bool)
    for layer in range(layers):
        for h in range(heads):  # each head its own tokens
            keep[layer, h, torch.randperm(n, generator=g)[: counts[layer][h]]] = True
    t.drop(vids, keep)
    return t, t.release_unheld(vids)


UNEQUAL = ((5, 9), (12, 1), (3, 3))  # adaptive head budgets


def same(a, b) -> bool:
    """Two HeadRows hold the same rows per head (padding aside)."""
    return torch.equal(a.lens, b.lens) and all(
        torch.equal(a.rows[h, : a.lens[h]], b.rows[h, : b.lens[h]]) for h in range(len(a.lens)))


@pytest.mark.parametrize("counts", [((5, 5), (12, 12), (3, 3)), UNEQUAL])
def test_build_indexes_exactly_the_rows_each_layer_and_head_keeps(counts):
    t, vids = compressed(counts=counts)
    index = KeptIndex(t)
    index.build(7, vids, room=4)
    for layer in range(3):
        got = index.request_rows(7, layer, vids)
        assert same(got, t.kept_rows(layer, vids))
        held = t.row_of[layer][:, vids]
        for h in range(2):  # in token order, exactly the held rows
            assert got.rows[h, : got.lens[h]].tolist() == held[h][held[h] >= 0].tolist()
    assert index.entries[7].lens.tolist() == [list(c) for c in counts]


@pytest.mark.parametrize("counts", [((5, 5), (12, 12), (3, 3)), UNEQUAL])
def test_decode_appends_each_new_token_and_grows_past_its_room(counts):
    t, vids = compressed(seed=1, counts=counts)
    index = KeptIndex(t)
    index.build(3, vids, room=1)
    seq = vids
    for _ in range(5):  # more steps than the room: the buffer grows
        new = t.alloc(1)
        seq = torch.cat([seq, new])
        index.append([3], new, [seq.numel()])
        for layer in range(3):
            assert same(index.request_rows(3, layer, seq), t.kept_rows(layer, seq))
    assert index.entries[3].lens.tolist() == [[c + 5 for c in layer] for layer in counts]


def test_an_entry_that_missed_a_step_or_left_the_batch_is_dropped():
    t, vids = compressed(seed=2)
    index = KeptIndex(t)
    index.build(1, vids, room=4)
    index.build(2, vids, room=4)
    new = t.alloc(1)
    index.append([1], new, [vids.numel() + 2])  # slot 1 is a step ahead of its entry; slot 2 left
    assert index.entries == {}
    seq = torch.cat([vids, new])
    assert same(index.request_rows(1, 1, seq), t.kept_rows(1, seq)), "falls back to the row table"
