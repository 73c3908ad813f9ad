"""What a policy keeps for one request, as the server and the replay of a retracted request read it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .reduce import LOCAL


@dataclass(frozen=True)
class Selection:
    """The rows one request keeps, in this process's KV heads.

    ``positions`` [L, H, W] int64 (on the scores' device): each head's kept prompt positions,
    ascending, window included; a head keeping fewer than W repeats ``n - 1`` (its last window
    position) at the end, so a mask scattered from it is exact. ``kept[l]`` is layer l's rows of
    it cut to the layer's widest head ([H, w_l]); ``counts[l, h]`` is how many rows head h keeps
    in layer l (window included). ``kept_per_layer`` (rows per head, averaged over heads) and
    ``kept_per_head`` [L][H] count the heads of every tensor-parallel rank.
    """

    prompt_len: int
    kept: list[torch.Tensor]
    counts: torch.Tensor
    kept_per_layer: list[int]
    kept_per_head: list[list[int]]
    positions: torch.Tensor | None = None

    def keep_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[L, H, n] bool on ``device`` (default: the positions'): True where (layer, head,
        position) is kept."""
        if self.positions is None:
            width = max(k.shape[1] for k in self.kept)
            pad = [torch.nn.functional.pad(k, (0, width - k.shape[1]), value=self.prompt_len - 1) for k in self.kept]
            return keep_masks(torch.stack(pad)[None], self.prompt_len)[0].to(device or pad[0].device)
        return keep_masks(self.positions[None].to(device or self.positions.device), self.prompt_len)[0]


def keep_masks(positions: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """[R, L, H, n] bool from :func:`~dkv_sglang.policy.choose`'s positions [R, L, H, W]: one scatter."""
    mask = torch.zeros(*positions.shape[:-1], prompt_len, dtype=torch.bool, device=positions.device)
    return mask.scatter_(-1, positions, True)


def selections(positions: torch.Tensor, counts: torch.Tensor, prompt_len: int, reducer=LOCAL) -> list[Selection]:
    """One :class:`Selection` per request from :func:`~dkv_sglang.policy.choose`'s output
    (positions [R, L, H, W], counts [R, L, H]), reading the counts to the host once (every rank
    of a tensor-parallel group must call it: it gathers the counts, one collective)."""
    heads = counts.shape[-1]
    every_head = reducer.gather(counts, dim=-1).cpu()  # [R, L, all heads]: the one host read
    mine = every_head[..., reducer.rank * heads : (reducer.rank + 1) * heads]
    widths = mine.amax(dim=-1).tolist() if heads else [[0] * counts.shape[1]] * counts.shape[0]
    per_layer = (every_head.sum(dim=-1) // every_head.shape[-1]).tolist()
    out = []
    for r, layer_widths in enumerate(widths):
        kept = [positions[r, layer, :, :width] for layer, width in enumerate(layer_widths)]
        out.append(Selection(prompt_len, kept, counts[r], per_layer[r], every_head[r].tolist(), positions[r]))
    return out
