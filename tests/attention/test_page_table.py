"""The page tables handed to FlashInfer, checked against the row table and a torch reference
(pure torch: no SGLang, no FlashInfer)."""

import pytest
import torch

from dkv_sglang.attention import page_table as pt
from dkv_sglang.attention.paged_reference import paged_attention
from dkv_sglang.memory.row_table import RowTable


def compressed_table(lens, layers=3, heads=2, seed=0):
    """A row table holding requests of ``lens`` tokens, each (layer, head) keeping its own subset."""
    g = torch.Generator().manual_seed(seed)
    t = RowTable(layers, heads, sum(lens) + 8, 4 * sum(lens) + 8)
    reqs = [t.alloc(n) for n in lens]
    for vids in reqs:
        n = len(vids)
        keep = torch.rand(layers, heads, n, generator=g) < 0.6
        keep[..., -1] = True  # the newest token is always held
        t.drop(vids, keep)
    return t, reqs


def test_tables_list_exactly_the_rows_each_layer_and_head_holds_in_token_order():
    lens = [7, 1, 12]
    t, reqs = compressed_table(lens)
    vids = torch.cat(reqs)
    tables = pt.build_tables(t.row_of, vids, lens)
    assert tables.num_layers == 3 and tables.num_entries == 6
    for layer in range(3):
        indptr, indices, last = tables.layer(layer)
        assert (last == (tables.kv_lens_cpu[layer] > 0).int()).all()
        for i, r in enumerate(reqs):
            for h in range(2):
                e = i * 2 + h
                want = t.row_of[layer, h, r]
                want = want[want >= 0]
                got = indices[indptr[e] : indptr[e + 1]]
                assert got.tolist() == want.tolist(), (layer, i, h)
    # layers' slices follow each other in one indices tensor, no row twice
    assert tables.indptr_cpu[0, 0] == 0
    assert (tables.indptr_cpu[1:, 0] == tables.indptr_cpu[:-1, -1]).all()
    assert tables.indptr_cpu[-1, -1] == tables.indices.numel() == tables.indices.unique().numel()


def test_entry_order_and_query_layout_round_trip():
    lens, heads, g = [3, 1, 4], 2, 3
    q = torch.randn(sum(lens), heads * g, 5)
    order = pt.query_order(lens, heads, "cpu")
    ent = pt.to_entries(q, order, heads)
    # entry (i, h) holds request i's tokens, query heads h*g .. h*g+g-1
    qo = pt.qo_indptr(lens, heads).tolist()
    starts = [0, 3, 4]
    for i, n in enumerate(lens):
        for h in range(heads):
            e = i * heads + h
            assert torch.equal(ent[qo[e] : qo[e + 1]], q[starts[i] : starts[i] + n, h * g : (h + 1) * g])
    assert torch.equal(pt.from_entries(ent, order, heads), q)
    lse = torch.randn(sum(lens), heads * g)
    assert torch.equal(pt.from_entries(pt.to_entries(lse, order, heads), order, heads), lse)


def test_batch_vids_reads_each_request_span():
    r2t = torch.arange(40, dtype=torch.int32).view(4, 10)
    got = pt.batch_vids(r2t, torch.tensor([2, 0]), [3, 2])
    assert got.tolist() == [20, 21, 22, 0, 1]


def test_page_size_16_tables_match_rows_and_reject_scattered_rows():
    """Rows laid out in pages of 16: one page id per 16 rows, partial last page."""
    p, d = 16, 4
    # entry 0: 40 rows in pages 3, 7, 2; entry 1: 16 rows in page 5; entry 2: empty
    rows = [torch.cat([torch.arange(pg * p, pg * p + p) for pg in (3, 7, 2)])[:40], torch.arange(5 * p, 6 * p)]
    kv_lens = torch.tensor([[40, 16, 0]])
    tables = pt._paginate([torch.cat(rows)], kv_lens, p, "cpu")
    assert tables.indices.tolist() == [3, 7, 2, 5]
    assert tables.indptr_cpu.tolist() == [[0, 3, 4, 4]]
    assert tables.last_page_len_cpu.tolist() == [[8, 16, 0]]
    k = torch.randn(8 * p, d)
    v = torch.randn(8 * p, d)
    q = torch.randn(3, 2, d)
    o, lse = paged_attention(
        q,
        k,
        v,
        [0, 1, 2, 3],
        tables.indptr_cpu[0].tolist(),
        tables.indices,
        tables.last_page_len_cpu[0].tolist(),
        p,
        0.5,
        causal=False,
    )
    for e, r in enumerate(rows):
        want = torch.softmax(q[e] @ k[r].T * 0.5, -1) @ v[r]
        assert torch.allclose(o[e], want, atol=1e-5)
    assert (o[2] == 0).all() and torch.isinf(lse[2]).all()
    with pytest.raises(ValueError):
        pt._paginate([torch.tensor([48, 50])], torch.tensor([[2]]), p, "cpu")  # a hole in page 3


def test_reference_matches_sdpa_on_built_tables():
    lens = [9, 4]
    t, reqs = compressed_table(lens, layers=2, heads=2, seed=3)
    k_rows = torch.randn(t.num_rows + 1, 8)
    v_rows = torch.randn(t.num_rows + 1, 8)
    tables = pt.build_tables(t.row_of, torch.cat(reqs), lens)
    q = torch.randn(4, 3, 8)  # 2 requests x 2 heads, group 3
    for layer in range(2):
        o, _ = paged_attention(
            q,
            k_rows,
            v_rows,
            [0, 1, 2, 3, 4],
            tables.indptr_cpu[layer].tolist(),
            tables.indices,
            tables.last_page_len_cpu[layer].tolist(),
            1,
            0.3,
            causal=False,
        )
        for i, r in enumerate(reqs):
            for h in range(2):
                rows = t.row_of[layer, h, r]
                rows = rows[rows >= 0].long()
                want = torch.nn.functional.scaled_dot_product_attention(
                    q[i * 2 + h][None], k_rows[rows][None], v_rows[rows][None], scale=0.3
                )[0]
                assert torch.allclose(o[i * 2 + h], want, atol=1e-5)


def paged_compressed_table(lens, layers=3, heads=2, page_size=16, seed=0):
    """A paged row table holding requests of ``lens`` tokens (placed request by request, then
    compressed: each (layer, head) keeps its own subset, packed into pages) and its K/V rows."""
    from dkv_sglang.memory.paged_table import PagedRowTable

    g = torch.Generator().manual_seed(seed)
    t = PagedRowTable(layers, heads, 2 * sum(lens) + 64, 4 * sum(lens) + 64, page_size)
    k_rows = torch.randn(t.num_rows + 1, 8, generator=g)
    v_rows = torch.randn(t.num_rows + 1, 8, generator=g)

    def move(src, dst):
        k_rows[dst], v_rows[dst] = k_rows[src].clone(), v_rows[src].clone()

    t.move = move
    vids = t.alloc(sum(lens))
    t.place(torch.zeros(len(lens), dtype=torch.int64), list(lens), vids)
    reqs = list(torch.split(vids, list(lens)))
    want = {}  # (request, layer, head) -> the K rows it keeps, in order (before packing moves them)
    for i, r in enumerate(reqs):
        keep = torch.rand(layers, heads, len(r), generator=g) < 0.5
        keep[..., -1] = True
        for layer in range(layers):
            for h in range(heads):
                rows = t.row_of[layer, h, r][keep[layer, h]].long()
                want[i, layer, h] = (k_rows[rows].clone(), v_rows[rows].clone())
        t.drop(r, keep)
    t.check()
    return t, reqs, k_rows, v_rows, want


@pytest.mark.parametrize("page_size", [16, 4])
def test_paged_pool_tables_give_page_ids_and_the_reference_the_kept_rows(page_size):
    lens = [70, 5, 33]
    t, reqs, k_rows, v_rows, want = paged_compressed_table(lens, page_size=page_size, seed=4)
    tables = pt.build_tables(t.row_of, torch.cat(reqs), lens, page_size)
    assert tables.page_size == page_size
    q = torch.randn(len(lens) * 2, 3, 8)
    for layer in range(3):
        indptr, last = tables.indptr_cpu[layer].tolist(), tables.last_page_len_cpu[layer].tolist()
        for i, r in enumerate(reqs):
            for h in range(2):
                e = i * 2 + h
                rows = t.row_of[layer, h, r]
                rows = rows[rows >= 0].long()
                n = len(rows)
                pages = tables.indices[indptr[e] : indptr[e + 1]].long()
                assert len(pages) == -(-n // page_size) and last[e] == n - (len(pages) - 1) * page_size
                assert pages.tolist() == (rows[::page_size] // page_size).tolist()
        o, _ = paged_attention(
            q, k_rows, v_rows, list(range(len(q) + 1)), indptr, tables.indices, last, page_size, 0.3, causal=False
        )
        for i in range(len(lens)):
            for h in range(2):
                k, v = want[i, layer, h]
                ref = torch.nn.functional.scaled_dot_product_attention(q[i * 2 + h][None], k[None], v[None], scale=0.3)[0]
                assert torch.allclose(o[i * 2 + h], ref, atol=1e-5)
