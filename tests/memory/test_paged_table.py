"""The paged row table: rows of each (request, layer, head) in its own pages of P, in position
order (pure torch, milliseconds)."""

import pytest
import torch

from dkv_sglang.memory.paged_table import UNPLACED, PagedRowTable

L, H, P = 3, 2, 16


class Pool:
    """A paged table with a K buffer whose values name the token and (layer, head) they hold."""

    def __init__(self, tokens=200, p=P):
        self.t = PagedRowTable(L, H, tokens, 8 * tokens, p)
        self.k = torch.full((self.t.num_rows + 1,), -1.0)
        self.t.move = self._move
        self.seqs: dict[int, list[int]] = {}

    def _move(self, src, dst):
        self.k[dst] = self.k[src].clone()

    def extend(self, counts: dict[int, int]):
        """New tokens for several requests in one batch (alloc for all, then place)."""
        vids = self.t.alloc(sum(counts.values()))
        assert vids is not None
        prev, parts, start = [], [], 0
        for r, n in counts.items():
            seq = self.seqs.setdefault(r, [])
            prev.append(seq[-1] if seq else 0)
            mine = vids[start : start + n]
            parts.append(mine)
            seq.extend(mine.tolist())
            start += n
        self.t.place(torch.tensor(prev), list(counts.values()), torch.cat(parts))
        for mine in parts:  # "write" K: value = vid * 100 + layer * 10 + head
            for layer in range(L):
                rows = self.t.write_rows(layer, mine).view(len(mine), H)
                for h in range(H):
                    self.k[rows[:, h]] = mine.float() * 100 + layer * 10 + h

    def entries_are_paged(self):
        """Every (request, layer, head) reads back its held tokens through pages in order."""
        for seq in self.seqs.values():
            vids = torch.tensor(seq)
            for layer in range(L):
                for h in range(H):
                    rows = self.t.row_of[layer, h, vids]
                    held = vids[rows >= 0]
                    rows = rows[rows >= 0].long()
                    pos = torch.arange(len(rows))
                    pages = rows // P
                    assert (rows % P == pos % P).all(), (layer, h)
                    assert (pages == pages[pos // P * P]).all()  # one page per P rows
                    assert len(set((pages[::P]).tolist())) == len(pages[::P])
                    assert torch.equal(self.k[rows], held.float() * 100 + layer * 10 + h)
        self.t.check()


def test_alloc_reserves_ids_and_place_fills_pages_in_order():
    pool = Pool()
    vids = pool.t.alloc(5)
    assert (pool.t.row_of[:, :, vids] == UNPLACED).all() and pool.t.unplaced == 5
    with pytest.raises(RuntimeError, match="no rows yet"):
        pool.t.write_rows(0, vids)
    pool.t.free(vids)
    assert pool.t.unplaced == 0
    pool.extend({1: 20, 2: 3, 3: 16})
    pool.entries_are_paged()
    # 20 tokens: 2 pages per (layer, head); 3: 1; 16: 1 -> 4 pages per (layer, head)
    assert pool.t.num_pages - len(pool.t.pages) == 4 * L * H


def test_decode_appends_into_the_last_page_then_takes_a_new_one():
    pool = Pool()
    pool.extend({1: 14, 2: 16})
    used = pool.t.num_pages - len(pool.t.pages)
    pool.extend({1: 1, 2: 1})  # request 1 fits its page (15 of 16), request 2 opens one
    assert pool.t.num_pages - len(pool.t.pages) == used + L * H
    pool.extend({1: 1, 2: 1})
    pool.extend({1: 1, 2: 1})  # request 1: 17 tokens now, a second page
    assert pool.t.num_pages - len(pool.t.pages) == used + 2 * L * H
    pool.entries_are_paged()


def test_chunks_continue_in_the_same_pages():
    pool = Pool()
    pool.extend({1: 10})
    pool.extend({1: 10, 2: 5})
    pool.extend({1: 30})
    pool.entries_are_paged()
    assert pool.t.num_pages - len(pool.t.pages) == (4 + 1) * L * H  # 50 tokens: 4 pages; 5: 1


def test_compress_packs_kept_rows_into_full_pages_and_frees_the_rest():
    g = torch.Generator().manual_seed(0)
    pool = Pool(tokens=400)
    pool.extend({1: 100, 2: 37, 3: 64})
    for r in (1, 3):
        vids = torch.tensor(pool.seqs[r])
        keep = torch.rand(L, H, len(vids), generator=g) < 0.3
        keep[0] = True  # layer 0 keeps everything
        keep[1] = False
        keep[1, :, :5] = True  # layer 1 keeps 5 rows
        keep[..., -1] = True
        freed = pool.t.drop(vids, keep)
        assert freed == int((~keep).sum())
    pool.entries_are_paged()
    # fragmentation: each (request, layer, head) holds ceil(rows / P) pages
    held_pages = 0
    for seq in pool.seqs.values():
        rows = pool.t.row_of[:, :, torch.tensor(seq)]
        held_pages += int(((rows >= 0).sum(-1) + P - 1).div(P, rounding_mode="floor").sum())
    assert pool.t.num_pages - len(pool.t.pages) == held_pages
    # decode after compression appends behind the kept rows
    pool.extend({1: 3, 2: 1, 3: 20})
    pool.entries_are_paged()


def test_free_returns_every_page_and_id():
    pool = Pool()
    pool.extend({1: 33, 2: 7})
    vids = torch.tensor(pool.seqs[1])
    keep = torch.rand(L, H, len(vids)) < 0.5
    keep[..., -1] = True
    pool.t.drop(vids, keep)
    pool.extend({1: 2, 2: 2})
    for seq in pool.seqs.values():
        pool.t.free(torch.tensor(seq))
    pool.seqs.clear()
    pool.t.check()
    assert len(pool.t.pages) == pool.t.num_pages
    assert len(pool.t.ids) == pool.t.ids.capacity
    assert pool.t.free_tokens() == pool.t.num_tokens


def test_capacity_counts_whole_free_pages_and_unplaced_ids():
    t = PagedRowTable(L, H, 64, 512, P)  # 64 * 6 / 16 = 24 pages
    assert t.num_pages == 24 and (t.num_rows + 1) % P == 0
    assert t.free_tokens() == 64
    vids = t.alloc(10)
    assert t.free_tokens() == 54
    t.place(torch.tensor([0, 0]), [1, 9], vids)  # 2 requests: 2 pages per (layer, head)
    assert len(t.pages) == 24 - 2 * L * H
    assert t.free_tokens() == 12 * P // (L * H)  # 12 free pages = 32 tokens, not 64 - 10
    assert t.alloc(33) is None
    t.check()


def test_place_refuses_when_pages_run_out():
    t = PagedRowTable(1, 1, 32, 64, P)  # 2 pages
    vids = t.alloc(3)
    with pytest.raises(MemoryError):
        t.place(torch.zeros(3, dtype=torch.int64), [1, 1, 1], vids)  # 3 new requests, 3 pages


def test_random_workload_never_leaks():
    g = torch.Generator().manual_seed(1)
    pool = Pool(tokens=600)
    live: dict[int, bool] = {}
    next_req, compressed_count, steps = 1, 0, 0
    for step in range(60):
        counts = {}
        for r in list(live):
            counts[r] = 1
        if step % 3 == 0:
            for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
                counts[next_req] = int(torch.randint(1, 70, (1,), generator=g))
                live[next_req] = False
                next_req += 1
        if pool.t.free_tokens() < sum(counts.values()) + P * len(counts):
            break
        if counts:
            pool.extend(counts)
        for r, compressed in list(live.items()):
            if not compressed and len(pool.seqs[r]) > 20:
                vids = torch.tensor(pool.seqs[r])
                keep = torch.rand(L, H, len(vids), generator=g) < 0.4
                keep[..., -4:] = True
                pool.t.drop(vids, keep)
                live[r] = True
                compressed_count += 1
        for r in list(live):
            if torch.rand(1, generator=g) < 0.1:
                pool.t.free(torch.tensor(pool.seqs.pop(r)))
                del live[r]
        pool.entries_are_paged()
        steps += 1
    assert steps > 40 and compressed_count > 5
    for r in list(pool.seqs):
        pool.t.free(torch.tensor(pool.seqs.pop(r)))
    pool.t.check()
    assert len(pool.t.pages) == pool.t.num_pages and pool.t.free_tokens() == pool.t.num_tokens
