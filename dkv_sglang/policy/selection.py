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
    position) at the end, so a mask scattered from it is exact. ``counts[l, h]`` is how many
    rows head h keeps in layer l (window included), ``widths[l]`` the most any head of layer l
    keeps. ``kept_per_layer`` (rows per head, averaged over heads) and ``kept_per_head`` [L][H]
    count the heads of every tensor-parallel rank.
    """

    prompt_len: int
    positions: torch.Tensor
    counts: torch.Tensor
    widths: list[int]
    kept_per_layer: list[int]
    kept_per_head: list[list[int]]

    @property
    def kept(self) -> list[torch.Tensor]:
        """Per layer, [H, w_l] its heads' positions cut to its widest head (w_l = ``widths[l]``)."""
        return [pos[:, :width] for pos, width in zip(self.positions.unbind(0), self.widths)]

    def keep_mask(self, device: torch.device | str | None = None) -> torch.Tensor:
        """[L, H, n] bool on ``device`` (default: the positions'): True where (layer, head,
        position) is kept."""
        return keep_masks(self.positions[None].to(device or self.positions.device), self.prompt_len)[0]


def keep_masks(positions: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """[R, L, H, n] bool from :func:`~dkv_sglang.policy.choose`'s positions [R, L, H, W]: one scatter."""
    mask = torch.zeros(*positions.shape[:-1], prompt_len, dtype=torch.bool, device=positions.device)
    return mask.scatter_(-1, positions, True)


def selections(positions: torch.Tensor, counts: torch.Tensor, prompt_len: int, reducer=LOCAL) -> list[Selection]:
    """One :class:`Selection` per request from :func:`~dkv_sglang.policy.choose`'s output
    (positions [R, L, H, W], counts [R, L, H]), reading the counts to the host once (every rank
    of a tensor-parallel group must call it: it gathers the counts, one collective). A fixed
    number of tensor ops, whatever R."""
    heads = counts.shape[-1]
    every_head = reducer.gather(counts, dim=-1).cpu()  # [R, L, all heads]: the one host read
    first = reducer.rank * heads
    per_head = every_head.tolist()
    return [
        Selection(prompt_len, pos, count, [max(layer[first : first + heads], default=0) for layer in mine],
                  [sum(layer) // len(layer) for layer in mine], mine)
        for pos, count, mine in zip(positions.unbind(0), counts.unbind(0), per_head)
    ]
