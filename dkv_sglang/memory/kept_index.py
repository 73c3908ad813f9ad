"""Every compressed request's kept rows, per layer and KV head, as one device tensor: what
decode reads.

Pure torch, no SGLang import. Without it a decode step would look up every token id of a
request's whole sequence in every layer and then drop the rows the policy freed: work that
grows with the prompt although the request attends only to its kept rows.

One structure for all requests. A compressed request holds an *entry*, found from SGLang's
request slot (``req_pool_idx``) through a host map; entries are compact (a freed one is handed
out again), so the device tensors grow with the compressed requests held at once, never with
the slot ids (SGLang hands out its highest slot first):

- ``rows`` [L, E + 1, H, C] int32, device: layer l, entry e, head h holds its kept prompt rows
  (position order) then one row per generated token (layer-major, the order of FlashInfer's
  tables); entry E is scratch (writes of requests without an entry land there, so a decode
  step writes every request in one op);
- ``base`` [E + 1, L, H] int32, device (and ``base_host``, its numpy mirror): rows each head
  held when the entry was built. Every decode step adds one row to every head, so a head's
  length is ``base + (seq_len - built_at)``: lengths never have to be read back from the device.
- host bookkeeping in numpy: ``entry_of`` (slot -> entry, -1: none), and per entry ``slot_of``
  (-1: free), ``built_at`` (sequence length at build), ``covered`` (length the entry covers now),
  ``widest`` (the longest head at build).

A decode step appends every request's new rows with one vectorized write (:meth:`append`);
which requests have an entry and how long their rows are is decided on the host from SGLang's
host-side lengths (``seq_lens_cpu``), never by a device sync. Requests without an entry (full
policy, short prompts) are read through ``req_to_token`` and the row table. An entry is freed
when its slot is (:func:`slots_freed`, which the plugin calls from SGLang's
``ReqToTokenPool.free_rows``), when a new prefill takes the slot, and when its request misses a
decode step.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from .row_table import RowTable


class KeptIndex:
    """Compact kept rows of the compressed requests, found by request slot."""

    def __init__(self, table: RowTable, entries: int = 8, capacity: int = 64):
        self.table = table
        self.device = table.row_of.device
        L, H = table.num_layers, table.num_heads
        self.rows = torch.zeros(L, entries + 1, H, capacity, dtype=torch.int32, device=self.device)
        self.base = torch.zeros(entries + 1, L, H, dtype=torch.int32, device=self.device)
        self.base_host = np.zeros((entries + 1, L, H), dtype=np.int64)
        self.built_at = np.full(entries + 1, -1, dtype=np.int64)
        self.covered = np.full(entries + 1, -1, dtype=np.int64)
        self.widest = np.zeros(entries + 1, dtype=np.int64)
        self.slot_of = np.full(entries + 1, -1, dtype=np.int64)  # the slot holding each entry
        self.entry_of = np.full(8, -1, dtype=np.int64)  # slot -> entry
        self._free = list(range(entries - 1, -1, -1))  # a stack: the lowest entry first

    # -- shape ------------------------------------------------------------------------------------
    @property
    def scratch(self) -> int:
        return self.rows.shape[1] - 1

    @property
    def capacity(self) -> int:
        return self.rows.shape[3]

    @property
    def held(self) -> int:
        """Entries held now."""
        return self.scratch - len(self._free)

    def _grow(self, entries: int, capacity: int) -> None:
        """Room for ``entries`` entries and ``capacity`` rows per head (doubling)."""
        old_e, old_c = self.scratch, self.capacity
        new_e, new_c = max(old_e, 1), max(old_c, 1)
        while new_e < entries:
            new_e *= 2
        while new_c < capacity:
            new_c *= 2
        if (new_e, new_c) == (old_e, old_c):
            return
        L, H = self.table.num_layers, self.table.num_heads
        rows = torch.zeros(L, new_e + 1, H, new_c, dtype=torch.int32, device=self.device)
        rows[:, :old_e, :, :old_c] = self.rows[:, :old_e]
        base = torch.zeros(new_e + 1, L, H, dtype=torch.int32, device=self.device)
        base[:old_e] = self.base[:old_e]
        self.rows, self.base = rows, base
        if new_e != old_e:
            grow = new_e - old_e
            self.base_host = np.concatenate([self.base_host[:old_e], np.zeros((grow + 1, L, H), np.int64)])
            self.built_at = np.concatenate([self.built_at[:old_e], np.full(grow + 1, -1, np.int64)])
            self.covered = np.concatenate([self.covered[:old_e], np.full(grow + 1, -1, np.int64)])
            self.widest = np.concatenate([self.widest[:old_e], np.zeros(grow + 1, np.int64)])
            self.slot_of = np.concatenate([self.slot_of[:old_e], np.full(grow + 1, -1, np.int64)])
            self._free = list(range(new_e - 1, old_e - 1, -1)) + self._free

    def entries(self, slots: np.ndarray) -> np.ndarray:
        """[B] (host) the entry of each slot; the scratch entry where a slot has none."""
        slots = np.asarray(slots, dtype=np.int64)
        inside = slots < len(self.entry_of)
        e = self.entry_of[np.where(inside, slots, 0)]
        return np.where(inside & (e >= 0), e, self.scratch)

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
        self.forget(slots)
        self._grow(self.held + len(slots), width + max(room, 1))
        if max(slots) >= len(self.entry_of):
            size = len(self.entry_of)
            while size <= max(slots):
                size *= 2
            self.entry_of = np.concatenate([self.entry_of, np.full(size - len(self.entry_of), -1, np.int64)])
        entries = self._free[: -len(slots) - 1 : -1]  # the top of the stack, popped in one slice
        del self._free[-len(slots):]
        self.entry_of[slots] = entries
        self.slot_of[entries] = slots
        idx = torch.tensor(entries, dtype=torch.int64, device=self.device)
        self.rows[:, idx, :, :width] = rows.to(device=self.device, dtype=torch.int32).transpose(0, 1)
        self.base[idx] = torch.from_numpy(counts).to(device=self.device, dtype=torch.int32)
        self.base_host[entries] = counts
        self.built_at[entries] = seq_lens
        self.covered[entries] = seq_lens
        self.widest[entries] = counts.reshape(len(slots), -1).max(axis=1)

    def forget(self, slots) -> None:
        """The requests in ``slots`` (one slot or several) are gone: their entries are free."""
        slots = np.atleast_1d(np.asarray(slots, dtype=np.int64))
        e = self.entries(slots)
        held = np.unique(e[e < self.scratch])
        if len(held) == 0:
            return
        self.entry_of[self.slot_of[held]] = -1
        self.slot_of[held] = -1
        self._free.extend(held.tolist())

    def reset(self) -> None:
        self.forget(self.slot_of[self.slot_of >= 0])

    def live(self, slots: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
        """[B] bool (host): which of ``slots`` have an entry covering ``seq_lens`` tokens."""
        return self._live(self.entries(slots), seq_lens)

    def _live(self, e: np.ndarray, seq_lens) -> np.ndarray:
        # a slot without an entry maps to the scratch entry, whose ``covered`` stays -1
        return (e < self.scratch) & (self.covered[e] == np.asarray(seq_lens))

    def lens(self, slots: np.ndarray, seq_lens: np.ndarray) -> np.ndarray:
        """[B, L, H] (host) rows each head of a live entry holds at ``seq_lens``."""
        e = self.entries(slots)
        return self.base_host[e] + (np.asarray(seq_lens) - self.built_at[e])[:, None, None]

    def width(self, slots: np.ndarray, seq_lens: np.ndarray) -> int:
        """The longest head of live entries ``slots`` at ``seq_lens`` (host)."""
        if len(slots) == 0:
            return 0
        e = self.entries(slots)
        return int((self.widest[e] + np.asarray(seq_lens) - self.built_at[e]).max())

    def append(self, slots: np.ndarray, vids: torch.Tensor, seq_lens: np.ndarray) -> None:
        """A decode step gave each request of ``slots`` one new token ``vids[i]`` (its rows are
        placed); ``slots`` and ``seq_lens`` (the lengths with it) are host arrays. Every live
        entry takes its new rows in one write; an entry that missed a step (its request
        retracted) is freed on the host, and its request is read through the row table."""
        slots = np.asarray(slots, dtype=np.int64)
        seq_lens = np.asarray(seq_lens, dtype=np.int64)
        if len(slots) == 0:
            return
        e = self.entries(slots)
        live = self._live(e, seq_lens - 1)
        self.forget(slots[~live & (e < self.scratch)])
        if not live.any():
            return
        e = np.where(live, e, self.scratch)
        need = int((self.widest[e[live]] + seq_lens[live] - self.built_at[e[live]]).max())
        self._grow(self.scratch, need)
        offset = np.where(live, seq_lens - 1 - self.built_at[e], 0)
        target = torch.from_numpy(e).to(self.device, non_blocking=True)
        offset = torch.from_numpy(offset).to(self.device, non_blocking=True)
        new = self.table.row_of[:, :, vids.reshape(-1).to(torch.int64)].transpose(1, 2)  # [L, B, H]
        col = (self.base[target] + offset[:, None, None].to(torch.int32)).transpose(0, 1)  # [L, B, H]
        L, H = new.shape[0], new.shape[2]
        layers = torch.arange(L, device=self.device)[:, None, None]
        heads = torch.arange(H, device=self.device)[None, None, :]
        self.rows.index_put_((layers, target[None, :, None], heads, col.long()), new)
        self.covered[e[live]] = seq_lens[live]


# SGLang's request-slot pool -> the kept-row index whose entries its slots hold (see slots_freed).
_INDEX_OF = weakref.WeakKeyDictionary()


def watch_slots(req_to_token_pool, index: KeptIndex) -> None:
    """``index``'s entries are keyed by ``req_to_token_pool``'s slots: free them with the slots."""
    _INDEX_OF[req_to_token_pool] = index


def slots_freed(req_to_token_pool, slots) -> None:
    """SGLang freed these request slots (``ReqToTokenPool.free_rows``): their requests are gone,
    and so are their kept-row entries."""
    index = _INDEX_OF.get(req_to_token_pool)
    if index is not None and len(slots):
        index.forget(slots)
