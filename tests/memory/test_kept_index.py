"""The kept-row index decode reads: one device tensor for every compressed request, holding
exactly the rows the row table holds for it, appended to in one write per decode step."""

import numpy as np
import pytest
import torch

from dkv_sglang.attention.page_table import decode_rows
from dkv_sglang.memory.kept_index import KeptIndex, slots_freed, watch_slots
from dkv_sglang.memory.row_table import RowTable


def compressed(t, seed=0, n=40, counts=((5, 5), (12, 12), (3, 3))):
    """A request whose (layer, head)s keep ``counts[layer][head]`` tokens each, chosen at random."""
    g = torch.Generator().manual_seed(seed)
    layers, heads = t.num_layers, t.num_heads
    vids = t.alloc(n)
    keep = torch.zeros(layers, heads, n, dtype=torch.bool)
    for layer in range(layers):
        for h in range(heads):  # each head its own tokens
            keep[layer, h, torch.randperm(n, generator=g)[: counts[layer][h]]] = True
    t.drop(vids, keep)
    return t.release_unheld(vids)


def index_rows(t, vids):
    """What the compressor hands the index: each head's held rows first, in position order."""
    held = t.row_of[:, :, vids]
    valid = held >= 0
    order = torch.sort((~valid).int(), dim=2, stable=True).indices
    return held.gather(2, order), valid.sum(dim=2).numpy()


def held_rows(t, layer, h, vids):
    rows = t.row_of[layer, h, vids]
    return rows[rows >= 0].tolist()


UNEQUAL = ((5, 9), (12, 1), (3, 3))  # adaptive head budgets


def check(index, t, seqs: dict[int, torch.Tensor]):
    """decode_rows reads, for every request and (layer, head), exactly the rows the table holds."""
    slots = np.array(list(seqs))
    lens = np.array([len(v) for v in seqs.values()])
    req_to_token = torch.zeros(max(slots) + 1, int(lens.max()), dtype=torch.int32)
    for s, v in seqs.items():
        req_to_token[s, : len(v)] = v.to(torch.int32)
    step = decode_rows(index, t.row_of, req_to_token, slots, lens)
    assert sorted(np.concatenate([g.members for g in step.groups]).tolist()) == list(range(len(slots)))
    for g in step.groups:
        for layer in range(t.num_layers):
            rows, valid = g.layer(layer)
            for i, member in enumerate(g.members):
                vids = seqs[int(slots[member])].long()
                for h in range(t.num_heads):
                    assert rows[i, h][valid[i, h]].tolist() == held_rows(t, layer, h, vids)
    return step


@pytest.mark.parametrize("counts", [((5, 5), (12, 12), (3, 3)), UNEQUAL])
def test_build_indexes_exactly_the_rows_each_layer_and_head_keeps(counts):
    t = RowTable(3, 2, 200, 800)
    vids = compressed(t, counts=counts)
    index = KeptIndex(t, entries=1)
    rows, lens = index_rows(t, vids)
    index.build([7], rows[None], lens[None], [len(vids)], room=4)  # slot 7: the slot map grows
    step = check(index, t, {7: vids})
    assert [g.compressed for g in step.groups] == [True]
    assert index.lens(np.array([7]), np.array([len(vids)]))[0].tolist() == [list(c) for c in counts]


@pytest.mark.parametrize("counts", [((5, 5), (12, 12), (3, 3)), UNEQUAL])
def test_decode_appends_each_new_token_in_one_write_and_grows_past_its_room(counts):
    t = RowTable(3, 2, 200, 800)
    a, b = compressed(t, seed=1, counts=counts), compressed(t, seed=2, counts=counts)
    plain = t.alloc(6)  # an uncompressed request in the same batch
    index = KeptIndex(t, capacity=4)
    for slot, vids in ((3, a), (5, b)):
        rows, lens = index_rows(t, vids)
        index.build([slot], rows[None], lens[None], [len(vids)], room=1)
    seqs = {3: a, 5: b, 0: plain}
    for _ in range(20):  # more steps than the room: the rows grow
        new = t.alloc(3)
        seqs = {s: torch.cat([v, new[i : i + 1]]) for i, (s, v) in enumerate(seqs.items())}
        index.append(np.array(list(seqs)), new, np.array([len(v) for v in seqs.values()]))
        step = check(index, t, seqs)
        assert sorted(g.compressed for g in step.groups) == [False, True]
    assert index.lens(np.array([3]), np.array([len(seqs[3])]))[0].tolist() == [[c + 20 for c in l] for l in counts]


def test_an_entry_that_missed_a_step_is_dropped_on_the_host():
    t = RowTable(3, 2, 200, 800)
    vids = compressed(t, seed=2)
    index = KeptIndex(t)
    rows, lens = index_rows(t, vids)
    index.build([1, 2], torch.stack([rows, rows]), np.stack([lens, lens]), [len(vids)] * 2, room=4)
    new = t.alloc(1)
    index.append(np.array([1]), new, np.array([len(vids) + 2]))  # a step ahead of its entry
    assert not index.live(np.array([1]), np.array([len(vids) + 2]))[0], "slot 1 reads the row table now"
    assert index.live(np.array([2]), np.array([len(vids)]))[0], "slot 2, not in the batch, is untouched"
    index.forget(2)
    assert not index.live(np.array([2]), np.array([len(vids)]))[0]


def test_entries_are_compact_whatever_the_slot_ids_and_freed_ones_are_reused():
    """SGLang hands out its highest request slot first: the index's device tensors grow with
    the requests it holds, never with slot ids."""
    t = RowTable(3, 2, 400, 1600)
    index = KeptIndex(t, entries=2)
    a = compressed(t, seed=3)
    rows, lens = index_rows(t, a)
    index.build([4096], rows[None], lens[None], [len(a)], room=4)
    shape = tuple(index.rows.shape)
    assert shape[1] == 3 and index.held == 1  # two entries and the scratch one
    check(index, t, {4096: a})
    index.forget(4096)
    assert index.held == 0 and not index.live(np.array([4096]), np.array([len(a)]))[0]
    b = compressed(t, seed=4)
    rows, lens = index_rows(t, b)
    index.build([4095], rows[None], lens[None], [len(b)], room=4)
    assert tuple(index.rows.shape) == shape, "the freed entry was handed out again"
    check(index, t, {4095: b})
    many = {5000 + i: compressed(t, seed=10 + i) for i in range(5)}
    built = [index_rows(t, v) for v in many.values()]
    index.build(list(many), torch.stack([r for r, _ in built]), np.stack([c for _, c in built]),
                [len(v) for v in many.values()], room=4)
    assert index.held == 6 and index.rows.shape[1] - 1 == 8  # doubled from 2 to 8, not to 5005
    check(index, t, {4095: b, **many})


def test_a_freed_slot_frees_its_entry():
    """The plugin calls slots_freed from SGLang's ReqToTokenPool.free_rows."""
    class Slots:  # stands for SGLang's ReqToTokenPool: only its identity matters here
        pass

    t = RowTable(3, 2, 200, 800)
    index, slots = KeptIndex(t), Slots()
    a = compressed(t, seed=5)
    rows, lens = index_rows(t, a)
    index.build([9, 12], torch.stack([rows, rows]), np.stack([lens, lens]), [len(a)] * 2, room=4)
    slots_freed(Slots(), [9])  # another pool's slots: untouched
    assert index.held == 2
    watch_slots(slots, index)
    slots_freed(slots, [9])
    assert index.held == 1 and index.live(np.array([9, 12]), np.array([len(a)] * 2)).tolist() == [False, True]
