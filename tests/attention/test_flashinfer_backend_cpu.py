"""The FlashInfer backend's metadata, run on CPU with the torch paged kernels, against the torch
backend (decode, prefill with recorded window scores, chunked prefill) and a direct per-request
SDPA (extend over a compressed prefix, which the torch backend refuses). Real SGLang pool
classes and layers, no engine: seconds."""

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("SGLANG_USE_CPU_ENGINE", "1")
from dkv_sglang import machine

machine.prepare()

from types import SimpleNamespace

from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import KVWriteLoc, ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from dkv_sglang.attention.flashinfer_backend import DkvFlashInferAttnBackend, default_to_flashinfer
from dkv_sglang.attention.paged_reference import TorchPagedKernels
from dkv_sglang.attention.torch_backend import DkvTorchAttnBackend
from dkv_sglang.memory.pool import DkvKVPool, PrefillPlan
from dkv_sglang.policy import PolicyConfig

L, H, D = 3, 2, 16


class World:
    """A dkv pool and request slots with both backends over them."""

    def __init__(self, group: int, seed: int = 0, config: PolicyConfig | None = None, page_size: int = 1):
        torch.manual_seed(seed)
        self.hq = H * group
        self.pool = DkvKVPool(1024, 1, torch.float32, H, D, L, "cpu", row_page_size=page_size)
        self.r2t = ReqToTokenPool(8, 512, "cpu", False)
        runner = SimpleNamespace(device="cpu", req_to_token_pool=self.r2t, token_to_kv_pool=self.pool)
        config = config or PolicyConfig()
        self.torch = DkvTorchAttnBackend(runner, config)
        self.fi = DkvFlashInferAttnBackend(runner, config, kernels=TorchPagedKernels(), num_q_heads=self.hq)
        self.layers = [RadixAttention(self.hq, D, D**-0.5, H, i) for i in range(L)]
        self.lens: dict[int, int] = {}

    def fill(self, slot: int, n: int) -> torch.Tensor:
        """Give request ``slot`` n more tokens with random K/V in every layer; their ids."""
        vids = self.pool.table.alloc(n)
        start = self.lens.get(slot, 0)
        self.r2t.req_to_token[slot, start : start + n] = vids.to(torch.int32)
        if self.pool.row_page_size > 1:  # the scheduler hook's job: rows in this request's pages
            prev = self.r2t.req_to_token[slot, start - 1].long() if start else torch.tensor(0)
            self.pool.table.place(prev.view(1), [n], vids)
        self.lens[slot] = start + n
        return vids

    def write(self, vids) -> None:
        for layer in self.layers:
            self.pool.set_kv_buffer(layer, KVWriteLoc(vids), torch.randn(len(vids), H, D), torch.randn(len(vids), H, D))

    def compress(self, slot: int, seed: int, ragged: bool = False) -> None:
        """Each layer keeps its own count, each head its own tokens (the same count per head, or
        with ``ragged`` each head its own count: adaptive head budgets)."""
        g = torch.Generator().manual_seed(seed)
        n = self.lens[slot]
        vids = self.r2t.req_to_token[slot, :n].long()
        keep = torch.zeros(L, H, n, dtype=torch.bool)
        for layer in range(L):
            k = int(torch.randint(1, n, (1,), generator=g))
            for h in range(H):
                if ragged:
                    k = int(torch.randint(1, n, (1,), generator=g))
                keep[layer, h, torch.randperm(n - 1, generator=g)[: k - 1]] = True
        keep[..., -1] = True
        self.pool.table.drop(vids, keep)
        self.index(slot)

    def index(self, slot: int) -> None:
        """Index a compressed request's kept rows, as the compressor does after a cut."""
        n = self.lens[slot]
        held = self.pool.table.row_of[:, :, self.r2t.req_to_token[slot, :n].long()]
        valid = held >= 0
        order = torch.sort((~valid).int(), dim=2, stable=True).indices
        rows = held.gather(2, order)
        self.pool.kept.build([slot], rows[None], valid.sum(dim=2)[None].numpy(), [n], room=4)

    def decode_tokens(self, slots: list[int]) -> torch.Tensor:
        """One new token per request, indexed as the scheduler's decode hook does."""
        new = torch.cat([self.fill(s, 1) for s in slots])
        self.pool.kept.append(np.array(slots), new, np.array([self.lens[s] for s in slots]))
        return new

    def batch(self, mode, slots, ext_lens, out_cache_loc):
        seq = torch.tensor([self.lens[s] for s in slots])
        ext = torch.tensor(ext_lens)
        return SimpleNamespace(
            forward_mode=mode,
            batch_size=len(slots),
            req_pool_indices=torch.tensor(slots),
            seq_lens=seq,
            seq_lens_cpu=seq,
            extend_seq_lens=ext,
            extend_prefix_lens=seq - ext,
            extend_seq_lens_cpu=ext_lens,
            extend_prefix_lens_cpu=(seq - ext).tolist(),
            out_cache_loc=out_cache_loc,
        )


PAGE_SIZES = [1, 16]


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("group", [1, 3])
def test_decode_matches_torch_backend_over_compressed_layers(group, page_size, ragged):
    w = World(group, page_size=page_size)
    slots, prompt = [1, 2, 3], [40, 9, 23]
    for s, n in zip(slots, prompt):
        w.write(w.fill(s, n))
        w.compress(s, seed=s, ragged=ragged)
    held = w.pool.table.held_per_head(w.r2t.req_to_token[1, :40].long())
    assert len(set(held[:, 0].tolist())) > 1, "layers must keep different counts"
    assert ragged == any(len(set(layer)) > 1 for layer in held.tolist()), "heads keep unequal counts iff ragged"
    for _step in range(2):
        new = w.decode_tokens(slots)
        fb = w.batch(ForwardMode.DECODE, slots, [1] * 3, new)
        w.fi.init_forward_metadata(fb)
        for layer in w.layers:
            q = torch.randn(3, w.hq * D)
            k, v = torch.randn(3, H * D), torch.randn(3, H * D)
            want = w.torch.forward_decode(q, k, v, layer, fb)
            got = w.fi.forward_decode(q, k, v, layer, fb)
            assert torch.allclose(got, want, atol=1e-5), layer.layer_id


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_decode_reads_each_layers_own_rows(page_size):
    """Planting a huge value in a row layer 0 dropped must not reach layer 0's output."""
    w = World(group=2, page_size=page_size)
    w.write(w.fill(1, 12))
    w.compress(1, seed=5)
    vids = w.r2t.req_to_token[1, :12].long()
    new = w.decode_tokens([1])
    fb = w.batch(ForwardMode.DECODE, [1], [1], new)
    w.fi.init_forward_metadata(fb)
    q, k, v = torch.randn(1, w.hq * D), torch.randn(1, H * D), torch.randn(1, H * D)
    before = w.fi.forward_decode(q, k, v, w.layers[0], fb)
    held_rows = set(w.pool.table.row_of[:, :, vids].reshape(-1).tolist())
    for r in range(1, w.pool.table.num_rows + 1):  # every row no layer of this request holds
        if r not in held_rows:
            w.pool.v_rows[r] = 1e6
    after = w.fi.forward_decode(q, k, v, w.layers[0], fb)
    assert torch.allclose(before, after)
    # ...and one it does hold does reach it
    w.pool.v_rows[w.pool.table.kept_rows(0, vids).rows[0, 0]] = 1e6
    assert w.fi.forward_decode(q, k, v, w.layers[0], fb).abs().max() > 1e3


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("group", [1, 3])
def test_prefill_matches_torch_backend_and_records_the_same_window_scores(group, page_size):
    config = PolicyConfig(policy="snapkv", budget=16, window=4)
    w = World(group, seed=1, config=config, page_size=page_size)
    slots, lens = [1, 2, 4], [30, 7, 20]
    new = torch.cat([w.fill(s, n) for s, n in zip(slots, lens)])
    for s, n in zip(slots, lens):
        w.pool.set_plan(s, PrefillPlan(config, prompt_len=n))
    fb = w.batch(ForwardMode.EXTEND, slots, lens, new)
    w.fi.init_forward_metadata(fb)
    for layer in w.layers:
        q = torch.randn(sum(lens), w.hq * D)
        k, v = torch.randn(sum(lens), H * D), torch.randn(sum(lens), H * D)
        want = w.torch.forward_extend(q, k, v, layer, fb)
        want_scores = w.pool.take_scores()
        got = w.fi.forward_extend(q, k, v, layer, fb)
        got_scores = w.pool.take_scores()
        assert torch.allclose(got, want, atol=1e-5)
        assert sorted(got_scores) == [1, 4], "requests longer than the budget are scored"
        for s in got_scores:
            a, b = got_scores[s][1][layer.layer_id], want_scores[s][1][layer.layer_id]
            assert a.shape == (H, w.lens[s] - 4) and torch.allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_chunked_prefill_merges_the_cached_prefix(page_size):
    w = World(group=2, seed=2, page_size=page_size)
    slots, prefix, ext = [1, 2, 3], [25, 0, 6], [5, 11, 1]
    for s, p in zip(slots, prefix):
        if p:
            w.write(w.fill(s, p))
    new = torch.cat([w.fill(s, e) for s, e in zip(slots, ext)])
    fb = w.batch(ForwardMode.EXTEND, slots, ext, new)
    w.fi.init_forward_metadata(fb)
    assert w.fi.extend.has_prefix
    for layer in w.layers:
        q = torch.randn(sum(ext), w.hq * D)
        k, v = torch.randn(sum(ext), H * D), torch.randn(sum(ext), H * D)
        want = w.torch.forward_extend(q, k, v, layer, fb)
        got = w.fi.forward_extend(q, k, v, layer, fb)
        assert torch.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("ragged", [False, True])
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_extend_over_a_compressed_prefix_matches_direct_sdpa(page_size, ragged):
    """Each (layer, head) attends to its own kept prefix rows, then causally to the new tokens."""
    w = World(group=3, seed=3, page_size=page_size)
    slots, prefix, ext = [1, 2], [30, 14], [4, 3]
    for s, p in zip(slots, prefix):
        w.write(w.fill(s, p))
        w.compress(s, seed=10 + s, ragged=ragged)
    kept = {(s, l): w.pool.table.kept_rows(l, w.r2t.req_to_token[s, :p].long())
            for s, p in zip(slots, prefix) for l in range(L)}
    new = torch.cat([w.fill(s, e) for s, e in zip(slots, ext)])
    fb = w.batch(ForwardMode.EXTEND, slots, ext, new)
    w.fi.init_forward_metadata(fb)
    for layer in w.layers:
        q = torch.randn(sum(ext), w.hq * D)
        k, v = torch.randn(sum(ext), H * D), torch.randn(sum(ext), H * D)
        got = w.fi.forward_extend(q, k, v, layer, fb).view(-1, w.hq, D)
        start = 0
        for s, e in zip(slots, ext):
            prefix_rows = kept[(s, layer.layer_id)]
            for h in range(H):  # each KV head over its own kept rows, with its query group
                rows = prefix_rows.rows[h, : prefix_rows.lens[h]]
                keys = torch.cat([w.pool.k_rows[rows], k[start : start + e].view(e, H, D)[:, h]])
                vals = torch.cat([w.pool.v_rows[rows], v[start : start + e].view(e, H, D)[:, h]])
                n = keys.shape[0]
                mask = torch.arange(n)[None, :] <= torch.arange(n - e, n)[:, None]
                heads = slice(h * 3, (h + 1) * 3)
                want = torch.nn.functional.scaled_dot_product_attention(
                    q[start : start + e].view(e, w.hq, D)[:, heads].transpose(0, 1),
                    keys.expand(3, -1, -1),
                    vals.expand(3, -1, -1),
                    attn_mask=mask,
                    scale=D**-0.5,
                )
                assert torch.allclose(got[start : start + e, heads], want.transpose(0, 1), atol=1e-5)
            start += e


def test_default_backend_is_flashinfer_only_on_cuda_when_none_chosen(monkeypatch):
    original = lambda view: {"attention_backend": "fa3"}
    none = SimpleNamespace(attention_backend=None, prefill_attention_backend=None, decode_attention_backend=None)
    chosen = SimpleNamespace(attention_backend="triton", prefill_attention_backend=None, decode_attention_backend=None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert default_to_flashinfer(original, none) == {"attention_backend": "flashinfer"}
    assert default_to_flashinfer(original, chosen) == {"attention_backend": "fa3"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert default_to_flashinfer(original, none) == {"attention_backend": "fa3"}
