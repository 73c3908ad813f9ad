"""How ranks of a tensor-parallel group agree on DynamicKV's budgets (pure torch).

With tensor parallelism each rank holds a shard of the KV heads, and DynamicKV's global top-k
runs over all heads. Two collectives make every rank decide the same budgets as one process
holding all heads: gather each rank's best local scores to find the global k-th score, then
sum the per-layer winner counts. One process is the world of size 1.
"""

from __future__ import annotations

import torch


class LocalReducer:
    """One process holds every head."""

    world = 1
    rank = 0

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        return values

    def sum(self, counts: torch.Tensor) -> torch.Tensor:
        return counts


class DistReducer:
    """The ranks of a ``torch.distributed`` group (gloo or any CPU-capable backend), each
    holding the same number of heads."""

    def __init__(self, group=None):
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def gather(self, values: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(values) for _ in range(self.world)]
        self._dist.all_gather(parts, values.contiguous(), group=self.group)
        return torch.cat(parts)

    def sum(self, counts: torch.Tensor) -> torch.Tensor:
        out = counts.clone()
        self._dist.all_reduce(out, group=self.group)
        return out


LOCAL = LocalReducer()
