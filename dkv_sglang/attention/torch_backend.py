"""The torch reference attention backend over the dkv pool (SGLang's CPU path).

It computes what SGLang's ``torch_native`` backend computes, with SDPA on the same key order,
but reads each layer's keys through the row table: after compression a layer attends to exactly
the rows it kept. An extend over a cached prefix (or an earlier chunk) runs its new queries only,
under a mask, where torch_native pads the queries to the whole sequence. During a prefill the
policy will cut, it also records the observation window's scores; a retracted request's
replayed prefill attends as its decode steps did (see ``PrefillPlan``).
"""

from __future__ import annotations

import torch
from sglang.srt.layers.attention.torch_native_backend import TorchNativeAttnBackend
from sglang.srt.mem_cache.memory_pool import KVWriteLoc
from torch.nn.functional import scaled_dot_product_attention

from . import page_table as pt

from ..memory.kept_index import watch_slots
from ..memory.pool import DkvKVPool
from ..policy import PolicyConfig, Selection, window_scores


def replay_mask(selection: Selection, layer: int, seq_len: int) -> torch.Tensor:
    """[H, seq_len, seq_len] causal mask of a replayed prefill: queries past the prompt see,
    of the prompt, only the rows ``selection`` kept in this layer (as they did in decode). A chunk
    that ends inside the prompt (``seq_len`` <= its length) is plainly causal."""
    n = selection.prompt_len
    pos = torch.arange(seq_len)
    causal = pos[None, :] <= pos[:, None]
    kept = torch.ones(selection.kept[layer].shape[0], max(seq_len, n), dtype=torch.bool)
    kept[:, :n] = False
    kept = kept.scatter_(1, selection.kept[layer].cpu(), True)[:, :seq_len]
    late = (pos >= n)[None, :, None]
    return causal[None] & (~late | kept[:, None, :])


class DkvTorchAttnBackend(TorchNativeAttnBackend):
    def __init__(self, model_runner, config: PolicyConfig):
        super().__init__(model_runner)
        if not isinstance(self.token_to_kv_pool, DkvKVPool):
            raise TypeError("DkvTorchAttnBackend needs the dkv pool (is the plugin loaded?)")
        self.pool: DkvKVPool = self.token_to_kv_pool
        self.config = config
        watch_slots(model_runner.req_to_token_pool, self.pool.kept)

    def _check_layer(self, layer):
        if layer.is_cross_attention or (layer.sliding_window_size is not None and layer.sliding_window_size > -1):
            raise NotImplementedError("dkv-sglang supports full causal self-attention layers only")

    def _attend(self, q, k, v, layer, causal: bool, mask=None):
        """q [Hq, Sq, D] against k/v [Hkv, S, D]: SDPA as SGLang's torch_native calls it.

        ``mask`` [Hkv, Sq, S] (True: attend) replaces the causal mask when given.
        """
        if not (q.dtype == k.dtype == v.dtype):
            k, v = k.to(q.dtype), v.to(q.dtype)
        if mask is not None:
            mask = mask.repeat_interleave(layer.tp_q_head_num // layer.tp_k_head_num, dim=0).unsqueeze(0)
        return (
            scaled_dot_product_attention(
                q.unsqueeze(0),
                k.unsqueeze(0),
                v.unsqueeze(0),
                attn_mask=mask,
                enable_gqa=layer.tp_q_head_num != layer.tp_k_head_num,
                scale=layer.scaling,
                is_causal=causal,
            )
            .squeeze(0)
            .movedim(1, 0)
        )

    def _store_and_shape(self, q, k, v, layer, forward_batch, save_kv_cache):
        """Write this step's K/V, then return q as [T, Hq, D] and an empty output [T, Hq, Dv]."""
        self._check_layer(layer)
        if save_kv_cache and k is not None and v is not None:
            self.pool.set_kv_buffer(layer, KVWriteLoc(forward_batch.out_cache_loc), k, v)
        q_ = q.reshape(-1, layer.tp_q_head_num, layer.qk_head_dim)
        return q_, q.new_empty((q_.shape[0], layer.tp_q_head_num, layer.v_head_dim))

    def forward_extend(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        q_, o = self._store_and_shape(q, k, v, layer, forward_batch, save_kv_cache)
        req_to_token = self.req_to_token_pool.req_to_token
        seq_lens = forward_batch.seq_lens.tolist()
        prefix_lens = forward_batch.extend_prefix_lens.tolist()
        ext_lens = forward_batch.extend_seq_lens.tolist()
        rpis = forward_batch.req_pool_indices.tolist()
        start = 0
        for rpi, seq_len, prefix_len, ext_len in zip(rpis, seq_lens, prefix_lens, ext_lens):
            end = start + ext_len
            vids = req_to_token[rpi, :seq_len]
            keys, values = self.pool.gather(layer.layer_id, vids)  # raises over a compressed prefix
            q_req = q_[start:end].movedim(0, 1)
            plan = self.pool.plan_of(rpi)
            if plan is not None and plan.replay is not None:
                mask = replay_mask(plan.replay, layer.layer_id - self.pool.start_layer, seq_len)
                o[start:end] = self._attend(q_req, keys, values, layer, causal=False, mask=mask[:, prefix_len:])
            elif prefix_len > 0 and 4 * ext_len < seq_len:
                # A few new queries on a long cached prefix (a prefix cache hit): each sees the
                # keys up to its own position, through an explicit mask (SDPA's unfused path).
                pos = torch.arange(seq_len, device=keys.device)
                mask = (pos[None, :] <= pos[prefix_len:, None]).expand(keys.shape[0], -1, -1)
                o[start:end] = self._attend(q_req, keys, values, layer, causal=False, mask=mask)
            elif prefix_len > 0:
                # A later chunk, or many new tokens: as SGLang's torch_native, the queries placed at
                # their positions in a zero query of the whole sequence, one causal call (the fused
                # kernel; from a quarter of the sequence on, faster than the mask, 5x at half).
                q_all = q_req.new_zeros((q_req.shape[0], seq_len, q_req.shape[2]))
                q_all[:, prefix_len:] = q_req
                o[start:end] = self._attend(q_all, keys, values, layer, causal=True)[prefix_len:]
            else:
                o[start:end] = self._attend(q_req, keys, values, layer, causal=True)
            if self.pool.needs_scores(rpi, seq_len):
                w = min(self.config.window, ext_len)
                prefix = seq_len - self.config.window
                scores = window_scores(q_[end - w : end], keys, layer.scaling)[:, :prefix]
                self.pool.record_scores(rpi, seq_len, layer.layer_id, scores)
            start = end
        return o.view(-1, layer.tp_q_head_num * layer.v_head_dim)

    def _decode_step(self, fb) -> pt.DecodeRows:
        """What every layer of this decode step reads, built once per step from host lengths."""
        if getattr(self, "_decode", (None,))[0] is not fb:
            slots = pt.host_ints(getattr(fb, "req_pool_indices_cpu", None), fb.req_pool_indices)
            seq_lens = pt.host_ints(fb.seq_lens_cpu, fb.seq_lens)
            step = pt.decode_rows(self.pool.kept, self.pool.table.row_of, self.req_to_token_pool.req_to_token,
                                  slots, seq_lens)
            self._decode = (fb, step)
        return self._decode[1]

    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True):
        q_, o = self._store_and_shape(q, k, v, layer, forward_batch, save_kv_cache)
        step = self._decode_step(forward_batch)
        li = layer.layer_id - self.pool.start_layer
        for g in step.groups:  # at most two: compressed requests, the others
            whole = len(step.groups) == 1
            rows, valid = g.layer(li)
            out = self._attend_padded(q_ if whole else q_.index_select(0, g.members_dev), rows, valid, layer)
            if whole:
                o[:] = out
            else:
                o.index_copy_(0, g.members_dev, out)
        return o.view(-1, layer.tp_q_head_num * layer.v_head_dim)

    def _attend_padded(self, q, rows: torch.Tensor, valid: torch.Tensor, layer) -> torch.Tensor:
        """A layer's decode in one SDPA call: q [B, Hq, D] against rows [B, H, W] (``valid``
        [B, H, W]: the rows each KV head attends to; the rest is padding). Returns [B, Hq, Dv]."""
        flat = rows.reshape(-1)  # one index_select per buffer: far cheaper than 3-D advanced indexing on a CPU
        keys = self.pool.k_rows.index_select(0, flat).view(*rows.shape, -1)  # [B, H, W, D]
        values = self.pool.v_rows.index_select(0, flat).view(*rows.shape, -1)
        if not (q.dtype == keys.dtype):
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        group = layer.tp_q_head_num // layer.tp_k_head_num
        out = scaled_dot_product_attention(
            q.unsqueeze(2), keys, values, attn_mask=valid.repeat_interleave(group, dim=1)[:, :, None, :],
            enable_gqa=group != 1, scale=layer.scaling,
        )
        return out.squeeze(2)
