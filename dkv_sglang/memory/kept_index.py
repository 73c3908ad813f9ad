"""Each compressed request's kept rows, per layer, as one compact index: what decode reads.

Pure torch, no SGLang import. Without it a decode step would look up every token id of a
request's whole sequence in every layer (``row_of[layer][:, vids]`` over the full prompt) and
then drop the rows the policy freed: work that grows with the prompt although the request
attends only to its kept rows. Here a request's rows are gathered once, when it is compressed,
into ``rows`` [L, H, capacity] (the first ``lens[l, h]`` entries of layer ``l``, head ``h`` are
its kept rows then its generated tokens, in position order; heads may keep unequal numbers of
rows), and each decode step appends the new token's rows. :meth:`KeptIndex.request_rows` is what
both attention backends read ((request, KV head) entries, positions in order): the torch backend
attends to them, the FlashInfer backend pages them into its tables.

Requests that were not compressed (full policy, short prompts) have no entry; they are read
through the row table as before (every row held, nothing to drop).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .row_table import HeadRows, RowTable


@dataclass
class KeptRows:
    rows: torch.Tensor  # [L, H, capacity] int64 head-rows; [l, h, :lens[l, h]] are valid
    lens: torch.Tensor  # [L, H] int64 (heads may keep unequal numbers)
    covered: int  # sequence length (tokens) the entry covers


class KeptIndex:
    """Compact kept rows of the compressed requests, keyed by SGLang's request slot."""

    def __init__(self, table: RowTable):
        self.table = table
        self.entries: dict[int, KeptRows] = {}

    def build(self, slot: int, vids: torch.Tensor, room: int) -> None:
        """After compression: index the rows ``vids`` (the request's whole sequence) still hold,
        with room for ``room`` more tokens before the buffer has to grow."""
        held = self.table.row_of[:, :, vids.reshape(-1).to(torch.int64)]  # [L, H, n]
        valid = held >= 0
        lens = valid.sum(dim=2)
        width = int(lens.max()) + max(room, 1)
        rows = torch.zeros(held.shape[0], held.shape[1], width, dtype=torch.int64, device=held.device)
        pos = torch.cumsum(valid.long(), dim=2) - 1  # each kept token's place in its (layer, head) list
        layer, head, tok = valid.nonzero(as_tuple=True)
        rows[layer, head, pos[layer, head, tok]] = held[layer, head, tok].long()
        self.entries[slot] = KeptRows(rows, lens, int(vids.numel()))

    def forget(self, slot: int) -> None:
        self.entries.pop(slot, None)

    def append(self, slots: list[int], vids: torch.Tensor, seq_lens: list[int]) -> None:
        """A decode step gave each request of ``slots`` one new token ``vids[i]`` (its rows are
        placed); ``seq_lens`` are the lengths with it. Entries of requests no longer decoding
        (finished, retracted) are dropped; an entry that missed a step is dropped too (its
        request is read through the row table instead)."""
        live = set(slots)
        for slot in [s for s in self.entries if s not in live]:
            del self.entries[slot]
        new_rows = self.table.row_of[:, :, vids.reshape(-1).to(torch.int64)]  # [L, H, B]
        layers = torch.arange(new_rows.shape[0], device=new_rows.device)[:, None]
        heads = torch.arange(new_rows.shape[1], device=new_rows.device)[None, :]
        for i, (slot, seq_len) in enumerate(zip(slots, seq_lens)):
            e = self.entries.get(slot)
            if e is None:
                continue
            if e.covered != seq_len - 1:
                del self.entries[slot]
                continue
            if int(e.lens.max()) >= e.rows.shape[2]:
                e.rows = torch.cat([e.rows, torch.zeros_like(e.rows)], dim=2)
            e.rows[layers, heads, e.lens] = new_rows[:, :, i].long()
            e.lens += 1
            e.covered = seq_len

    def request_rows(self, slot: int, layer: int, vids: torch.Tensor) -> HeadRows:
        """The head-rows one request attends to in ``layer`` (``vids``: its sequence, read only
        when it has no entry)."""
        e = self.entries.get(slot)
        if e is not None and e.covered == vids.numel():
            lens = e.lens[layer]
            return HeadRows(e.rows[layer, :, : int(lens.max())], lens.clone())
        return self.table.kept_rows(layer, vids)
