"""The compact kept-row index decode reads: the same rows the row table holds, without
looking up the whole sequence."""

import torch

from dkv_sglang.memory.kept_index import KeptIndex
from dkv_sglang.memory.row_table import RowTable


def compressed(seed=0, n=40, layers=3, heads=2):
    g = torch.Generator().manual_seed(seed)
    t = RowTable(layers, heads, 200, 800)
    vids = t.alloc(n)
    keep = torch.zeros(layers, heads, n, dtype=torch.bool)
    for layer, k in enumerate((5, 12, 3)[:layers]):
        for h in range(heads):  # each head its own tokens, as many per layer
            keep[layer, h, torch.randperm(n, generator=g)[:k]] = True
    t.drop(vids, keep)
    return t, t.release_unheld(vids)


def test_build_indexes_exactly_the_rows_each_layer_and_head_keeps():
    t, vids = compressed()
    index = KeptIndex(t)
    index.build(7, vids, room=4)
    for layer in range(3):
        assert torch.equal(index.request_rows(7, layer, vids), t.kept_rows(layer, vids))
    assert index.entries[7].lens.tolist() == [5, 12, 3]


def test_decode_appends_each_new_token_and_grows_past_its_room():
    t, vids = compressed(seed=1)
    index = KeptIndex(t)
    index.build(3, vids, room=1)
    seq = vids
    for _ in range(5):  # more steps than the room: the buffer grows
        new = t.alloc(1)
        seq = torch.cat([seq, new])
        index.append([3], new, [seq.numel()])
        for layer in range(3):
            assert torch.equal(index.request_rows(3, layer, seq), t.kept_rows(layer, seq))
    assert index.entries[3].lens.tolist() == [10, 17, 8]


def test_an_entry_that_missed_a_step_or_left_the_batch_is_dropped():
    t, vids = compressed(seed=2)
    index = KeptIndex(t)
    index.build(1, vids, room=4)
    index.build(2, vids, room=4)
    new = t.alloc(1)
    index.append([1], new, [vids.numel() + 2])  # slot 1 is a step ahead of its entry; slot 2 left
    assert index.entries == {}
    seq = torch.cat([vids, new])
    assert torch.equal(index.request_rows(1, 1, seq), t.kept_rows(1, seq)), "falls back to the row table"
