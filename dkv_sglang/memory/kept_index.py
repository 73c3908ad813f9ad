"""Every compressed request's kept rows, per layer and KV head, as one device tensor: what
decode reads.

Pure torch, no SGLang import. Without it a decode step would look up every token id of a
request's whole sequence in every layer and then drop the rows the policy freed: work that
grows with the prompt although the request attends only to its kept rows.

One structure for all requests, keyed by SGLang's request slot (``req_pool_idx``):

- ``rows`` [L, S + 1, H, C] int32, device: layer l, slot s, head h holds its kept prompt rows
  (position order) then one row per generated token (layer-major, the order of FlashInfer's
  tables, so a batch's rows are one ``index_select``); slot S is scratch (writes of requests
  without an entry land there, so a decode step writes every request in one op);
- ``base`` [S + 1, L, H] int32, device (and ``base_host``, its numpy mirror): rows each head
  held when the entry was built. Every decode step adds one row to every head, so a head's
  length is ``base + (seq_len - built_at)``: lengths never have to be read back from the device.
- host bookkeeping in numpy: ``built_at`` (sequence length at build, -1: no entry), ``covered``
  (length the entry covers now), ``widest`` (the longest head at build).

A decode step appends every request's new rows with one vectorized write (:meth:`append`);
which requests have an entry and how long their rows are is decided on the host from SGLang's
host-side lengths (``seq_lens_cpu``), never by a device sync. Requests without an entry (full
policy, short prompts) are read through ``req_to_token`` and the row table.
"""

from __future__ import annotations

import numpy as np
import torch

from .row_table import RowTable


class KeptIndex:
    """Compact kept rows of the compressed requests, keyed by request slot."""

    def __init__(self, table: RowTable, slots: int = 8, capacity: int = 64):
        self.table = table
        self.device = table.row_of.device
        L, H = table.num_layers, table.num_heads
        self.rows = torch.zeros(L, slots + 1, H, capacity, dtype=torch.int32, device=self.device)
        self.base = torch.zeros(slots + 1, L, H, dtype=torch.int32, device=self.device)
        self.base_host = np.zeros((slots + 1, L, H), dtype=np.int64)
        self.built_at = np.full(slots + 1, -1, dtype=np.int64)
        self.covered = np.full(slots + 1, -1, dtype=np.int64)
        self.widest = np.zeros(slots + 1, dtype=np.int64)

    # -- shape ------------------------------------------------------------------------------------
    @property
    def scratch(self) -> int:
        return self.rows.shape[1] - 1

    @property
    def capacity(self) -> int:
        return self.rows.shape[3]

    def _grow(self, slots: int, capacity: int) -> None:
        """Room for slot ids below ``slots`` and ``capacity`` rows per head (doubling)."""
        old_s, old_c = self.scratch, self.capacity
        new_s, new_c = old_s, old_c
        while new_s < slots:
            new_s *= 2
        while new_c < capacity:
            new_c *= 2
        if (new_s, new_c) == (old_s, old_c):
            return
        L, H = self.table.num_layers, self.table.num_heads
        rows = torch.zeros(L, new_s + 1, H, new_c, dtype=torch.int32, device=self.device)
        rows[:, :old_s, :, :old_c] = self.rows[:, :old_s]
        base = torch.zeros(new_s + 1, L, H, dtype=torch.int32, device=self.device)
        base[:old_s] = self.base[:old_s]
        self.rows, self.base = rows, base
        if new_s != old_s:
            grow = new_s - old_s
            self.base_host = np.concatenate([self.base_host[:old_s], np.zeros((grow + 1, L, H), np.int64)])
            self.built_at = np.concatenate([self.built_at[:old_s], np.full(grow + 1, -1, np.int64)])
            self.covered = np.concatenate([self.covered[:old_s], np.full(grow + 1, -1, np.int64)])
            self.widest = np.concatenate([self.widest[:old_s], np.zeros(grow + 1, np.int64)])

    # -- entries ------------------------------------------------------------------------------------
    def build(self, slots: list[int], rows: torch.Tensor, counts: np.ndarray, seq_lens: list[int], room: int) -> None:
        """After compression: index ``rows`` [R, L, H, W] (each head's kept rows first, in
        position order, then padding) with ``counts`` [R, L, H] (host) of them valid, for the
        requests in ``slots`` whose sequences are ``seq_lens`` long; room for ``room`` more
        tokens before the rows have to grow. One write for the whole batch."""
        if not slots:
            return
        counts = np.asarray(counts, dtype=np.int64)
        width = rows.shape[3]
        self._grow(max(slots) + 1, width + max(room, 1))
        idx = torch.tensor(slots, dtype=torch.int64, device=self.device)
        self.rows[:, idx, :, :width] = rows.to(device=self.device, dtype=torch.int32).transpose(0, 1)
        self.base[idx] = torch.from_numpy(counts).to(device=self.device, dtype=torch.int32)
        self.base_host[slots] = counts
        self.built_at[slots] = seq_lens
        self.covered[slots] = seq_lens
        self.widest[slots] = counts.reshape(len(slots), -1).max(axis=1)

    def forget(self, slot: int) -> None:
        if slot < len(self.built_at):
            self.built_at[slot] = self.covered[slot] = -1

    def reset(self) -> None:
        self.built_at[:] = -1
        self.covered[:] = -1

    def live(self, slots: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
        """[B] bool (host): which of ``slots`` have an entry covering ``seq_lens`` tokens."""
        slots = np.asarray(slots, dtype=np.int64)
        inside = slots < self.scratch
        safe = np.where(inside, slots, self.scratch)
        return inside & (self.built_at[safe] >= 0) & (self.covered[safe] == np.asarray(seq_lens))

    def lens(self, slots: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
        """[B, L, H] (host) rows each head of a live entry holds at ``seq_lens``."""
        return self.base_host[slots] + (np.asarray(seq_lens) - self.built_at[slots])[:, None, None]

    def width(self, slots: np.ndarray, seq_lens: np.ndarray) -> int:
        """The longest head of live entries ``slots`` at ``seq_lens`` (host)."""
        if len(slots) == 0:
            return 0
        return int((self.widest[slots] + np.asarray(seq_lens) - self.built_at[slots]).max())

    def append(self, slots: np.ndarray, vids: torch.Tensor, seq_lens: np.ndarray) -> None:
        """A decode step gave each request of ``slots`` one new token ``vids[i]`` (its rows are
        placed); ``slots`` and ``seq_lens`` (the lengths with it) are host arrays. Every live entry takes its new rows in one write; an entry that missed a step
        (its request retracted, or its slot reused) is dropped on the host, and its request is
        read through the row table."""
        slots = np.asarray(slots, dtype=np.int64)
        seq_lens = np.asarray(seq_lens, dtype=np.int64)
        if len(slots) == 0:
            return
        live = self.live(slots, seq_lens - 1)
        stale = slots[~live & (slots < self.scratch)]
        self.built_at[stale] = -1
        self.covered[stale] = -1
        if not live.any():
            return
        live_slots = slots[live]
        need = int((self.widest[live_slots] + seq_lens[live] - self.built_at[live_slots]).max())
        self._grow(self.scratch, need)
        offset = np.where(live, seq_lens - 1 - self.built_at[np.where(live, slots, self.scratch)], 0)
        target = torch.from_numpy(np.where(live, slots, self.scratch)).to(self.device, non_blocking=True)
        offset = torch.from_numpy(offset).to(self.device, non_blocking=True)
        new = self.table.row_of[:, :, vids.reshape(-1).to(torch.int64)].transpose(1, 2)  # [L, B, H]
        col = (self.base[target] + offset[:, None, None].to(torch.int32)).transpose(0, 1)  # [L, B, H]
        L, H = new.shape[0], new.shape[2]
        layers = torch.arange(L, device=self.device)[:, None, None]
        heads = torch.arange(H, device=self.device)[None, None, :]
        self.rows.index_put_((layers, target[None, :, None], heads, col.long()), new)
        self.covered[live_slots] = seq_lens[live]
