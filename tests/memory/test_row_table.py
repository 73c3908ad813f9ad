import pytest
import torch

from dkv_sglang.memory.row_table import RowTable


def make(tokens=10, layers=3, heads=2, ids=40):
    return RowTable(layers, heads, tokens, ids)


def test_alloc_takes_a_row_per_layer_and_head_and_free_returns_all():
    t = make()
    assert t.free_tokens() == 10 and t.free_layer_rows() == 30
    vids = t.alloc(4)
    assert vids.tolist() and 0 not in vids.tolist()
    rows = t.row_of[:, :, vids]
    assert (rows > 0).all() and rows.unique().numel() == 4 * 3 * 2
    assert t.free_tokens() == 6 and t.free_layer_rows() == 18
    assert t.alloc(7) is None
    t.free(vids)
    assert t.free_tokens() == 10 and t.free_head_rows() == 60
    assert (t.row_of[:, :, vids] == -1).all()


def test_drop_frees_exactly_the_dropped_rows_and_they_serve_other_tokens():
    t = make()
    vids = t.alloc(10)
    assert t.free_tokens() == 0
    keep = torch.ones(3, 2, 10, dtype=torch.bool)
    keep[:, :, :6] = False  # every layer and head drops 6 of 10 tokens
    assert t.drop(vids, keep) == 6 * 3 * 2
    assert t.drop(vids, keep) == 0, "rows already dropped are not freed twice"
    assert t.free_tokens() == 6
    assert t.held_per_head(vids).tolist() == [[4, 4]] * 3
    more = t.alloc(6)  # the dropped rows now hold other tokens, in every layer
    assert more is not None and t.free_tokens() == 0
    t.free(vids)
    t.free(more)
    assert t.free_tokens() == 10 and t.free_head_rows() == 60


def test_kept_rows_per_head_in_token_order():
    t = make(tokens=5, layers=1, heads=2)
    vids = t.alloc(5)
    keep = torch.tensor([[[1, 0, 1, 0, 1], [0, 1, 1, 1, 0]]], dtype=torch.bool)
    before = t.row_of[0][:, vids].clone()
    t.drop(vids, keep)
    rows = t.kept_rows(0, vids)
    assert rows.rows.tolist() == [before[0, [0, 2, 4]].tolist(), before[1, [1, 2, 3]].tolist()]
    assert rows.uniform and rows.lens.tolist() == [3, 3]
    # heads keeping unequal numbers: each head's rows first, padded with row 0
    t.drop(vids, torch.tensor([[[1, 0, 0, 0, 1], [0, 1, 1, 1, 0]]], dtype=torch.bool))
    rows = t.kept_rows(0, vids)
    assert rows.rows.tolist() == [before[0, [0, 4]].tolist() + [0], before[1, [1, 2, 3]].tolist()]
    assert rows.lens.tolist() == [2, 3] and not rows.uniform
    assert rows.mask().tolist() == [[True, True, False], [True, True, True]]
    assert t.held_per_head(vids).tolist() == [[2, 3]]


def test_write_rows_are_token_major():
    t = make(tokens=4, layers=2, heads=3)
    vids = t.alloc(2)
    rows = t.write_rows(1, vids)
    assert rows.tolist() == t.row_of[1][:, vids].t().reshape(-1).tolist()


def test_ids_can_outnumber_rows_once_compressed():
    t = make(tokens=2, layers=1, heads=1, ids=6)
    a = t.alloc(2)
    t.drop(a, torch.zeros(1, 1, 2, dtype=torch.bool))
    b = t.alloc(2)
    t.drop(b, torch.zeros(1, 1, 2, dtype=torch.bool))
    c = t.alloc(2)
    assert c is not None and t.free_tokens() == 0  # ids exhausted, rows not
    for v in (a, b, c):
        t.free(v)
    assert t.free_tokens() == 2


def test_double_free_is_caught():
    t = make(tokens=2, layers=1, heads=1, ids=2)
    v = t.alloc(2)
    t.free(v)
    with pytest.raises(AssertionError):
        t.free(v)


def test_fork_copies_the_kept_rows_to_new_ids_and_leaves_the_source_whole():
    t = make(tokens=10, ids=40)
    shared = t.alloc(6)  # owned by someone else (the prefix cache)
    before = t.row_of[:, :, shared].clone()
    keep = torch.zeros(3, 2, 6, dtype=torch.bool)
    keep[0, :, :2] = True
    keep[1, 0, 4] = keep[1, 1, 5] = True  # heads may keep different tokens
    keep[2, :, 3] = True
    new, src, dst = t.fork(shared, keep)
    assert torch.equal(t.row_of[:, :, shared], before), "the source ids keep every row"
    assert set(new.tolist()).isdisjoint(shared.tolist())
    assert src.numel() == dst.numel() == int(keep.sum())
    assert set(dst.tolist()).isdisjoint(before.flatten().tolist())
    rows = t.row_of[:, :, new]
    assert torch.equal(rows >= 0, keep) and torch.equal(rows[keep].long(), dst)
    assert torch.equal(before[keep].long(), src), "each new row copies the row at the same place"
    assert t.free_head_rows() == 60 - 36 - 8
    t.free(shared)
    t.free(new)
    assert t.free_head_rows() == 60 and len(t.ids) == 40


def test_fork_refuses_when_the_rows_are_not_free():
    t = make(tokens=4, ids=40)
    vids = t.alloc(4)
    assert t.fork(vids, torch.ones(3, 2, 4, dtype=torch.bool)) is None
    assert t.free_head_rows() == 0 and len(t.ids) == 36, "a refused fork takes nothing"


def test_tokens_kept_nowhere_give_their_ids_back_and_read_as_the_hole():
    t = make(tokens=10, layers=3, heads=2, ids=12)
    vids = t.alloc(8)
    keep = torch.zeros(3, 2, 8, dtype=torch.bool)
    keep[0, :, 1] = keep[2, :, 5] = True  # tokens 1 and 5 stay somewhere; 5 others nowhere
    keep[:, :, 7] = True
    t.drop(vids, keep)
    assert len(t.ids) == 4
    left = t.release_unheld(vids)
    assert len(t.ids) == 4 + 5, "ids of the tokens no (layer, head) keeps are free again"
    assert left.tolist() == [t.hole, vids[1], t.hole, t.hole, t.hole, vids[5], t.hole, vids[7]]
    assert (t.row_of[:, :, t.hole] == -1).all() and t.kept_rows(0, left).rows.shape == (2, 2)
    again = t.alloc(9 - 8 + 4)  # the freed ids serve new tokens (rows permitting)
    assert again is not None and t.hole not in again.tolist()
    t.free(left)  # the hole, listed five times, is skipped
    t.free(again)
    assert len(t.ids) == 12 and t.free_head_rows() == 60


def test_fork_takes_ids_only_for_tokens_kept_somewhere():
    t = make(tokens=10, layers=3, heads=2, ids=12)
    shared = t.alloc(8)
    keep = torch.zeros(3, 2, 8, dtype=torch.bool)
    keep[1, 1, 2] = keep[:, :, 7].fill_(True)[0, 0]
    assert t.fork_need(shared, keep) == (1 + 6, 2)
    new, src, dst = t.fork(shared, keep)
    assert len(t.ids) == 12 - 8 - 2 and src.numel() == dst.numel() == 7
    assert [v == t.hole for v in new.tolist()] == [True, True, False, True, True, True, True, False]
    t.free(shared)
    t.free(new)
    assert len(t.ids) == 12 and t.free_head_rows() == 60
