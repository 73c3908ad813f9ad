"""How ranks of a tensor-parallel group agree on DynamicKV's budgets (pure torch).

With tensor parallelism each rank holds a shard of the KV heads, and DynamicKV's global top-k
runs over all heads. Two collectives make every rank decide the same budgets as one process
holding all heads: gather each rank's best local scores to find the global k-th score, then
sum the per-layer winner counts. One process is the world of size 1.

Every rank must make the same calls in the same order, with tensors of the same shapes: the
batched selection makes a fixed number of them per batch, whatever the requests.
"""

from __future__ import annotations

import torch


class LocalReducer:
    """One process holds every head."""

    world = 1
    rank = 0

    def gather(self, values: torch.Tensor, dim: int = 0) -> torch.Tensor:
        return values

    def sum(self, counts: torch.Tensor) -> torch.Tensor:
        return counts


class DistReducer:
    """The ranks of a ``torch.distributed`` group, each holding the same number of heads.

    On a gloo group, tensors on another device go through the host for the collective and
    come back to their device (a device-to-host copy each: a sync on a GPU).
    """

    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._host_only = dist.get_backend(group) == "gloo"

    def gather(self, values: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Every rank's ``values``, concatenated along ``dim`` in rank order."""
        mine = self._to_backend(values).contiguous()
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        self._dist.all_gather(parts, mine, group=self.group)
        return torch.cat(parts, dim=dim).to(values.device)

    def sum(self, counts: torch.Tensor) -> torch.Tensor:
        out = self._to_backend(counts).clone()
        self._dist.all_reduce(out, group=self.group)
        return out.to(counts.device)

    def _to_backend(self, values: torch.Tensor) -> torch.Tensor:
        return values.cpu() if self._host_only else values


LOCAL = LocalReducer()
