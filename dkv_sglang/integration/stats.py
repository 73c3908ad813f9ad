"""The ``dkv`` stats a scheduler reports (``GET /dkv/stats``, ``Engine.dkv_stats()``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ..policy import PolicyConfig


@dataclass
class Counters:
    """Scheduler-side counts since start (this process)."""

    peak_running: int = 0  # most requests in one decode batch
    retracted: int = 0  # requests retracted under memory pressure


COUNTERS = Counters()


def dkv_stats(scheduler, config: PolicyConfig) -> dict:
    from ..memory.pool import DkvAllocator

    allocator = scheduler.token_to_kv_pool_allocator
    out = {"policy": config.policy, "budget": config.budget, "config": asdict(config)}
    out.update(
        running_requests=len(scheduler.running_batch.reqs),
        peak_running_requests=COUNTERS.peak_running,
        retracted_requests=COUNTERS.retracted,
    )
    if isinstance(allocator, DkvAllocator):
        out.update(allocator.stats())
    else:  # vanilla SGLang: every token holds a row in every layer
        layers = scheduler.tp_worker.model_runner.model_config.num_hidden_layers
        out.update(
            num_layers=layers,
            pool_rows_total=scheduler.max_total_num_tokens * layers,
            pool_rows_free=allocator.available_size() * layers,
            requests_compressed=0,
            recent=[],
        )
    # Rows SGLang's prefix cache holds for no running request: whole prompts (all layers),
    # evicted when a new request needs the room. Idle: free + cached == total.
    tree = scheduler.tree_cache
    cached = tree.evictable_size() if tree is not None and tree.supports_prefix_sharing() else 0
    out["pool_rows_cached"] = cached * out["num_layers"]
    return out
