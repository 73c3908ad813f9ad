"""Prometheus series for ``/metrics`` (with ``--enable-metrics``), written by the scheduler.

SGLang runs prometheus_client in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``): series made
in the scheduler process appear on the HTTP server's ``/metrics``. Without that variable (no
``--enable-metrics``) nothing is created and recording costs nothing.
"""

from __future__ import annotations

import os

_metrics = None


class DkvMetrics:
    def __init__(self, num_layers: int):
        from prometheus_client import Counter, Gauge

        self.requests_compressed = Counter("dkv:requests_compressed", "Requests whose prompt rows were cut")
        self.prompt_rows = Counter("dkv:prompt_rows", "Layer-rows of compressed prompts before the cut")
        self.kept_rows = Counter("dkv:kept_rows", "Layer-rows of compressed prompts kept (retention = kept / prompt)")
        self.pool_rows_free = Gauge("dkv:pool_rows_free", "Free layer-rows in the KV pool", multiprocess_mode="mostrecent")
        self.kept_rows_by_layer = Counter(
            "dkv:kept_rows_by_layer", "Prompt rows kept per layer, summed over compressed requests", ["layer"]
        )
        self.layers = [self.kept_rows_by_layer.labels(layer=str(i)) for i in range(num_layers)]


def _get(num_layers: int) -> DkvMetrics | None:
    global _metrics
    if _metrics is None and os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _metrics = DkvMetrics(num_layers)
    return _metrics


def record_compression(allocator, prompt_len: int, kept_per_layer: list[int]) -> None:
    m = _get(len(kept_per_layer))
    if m is None:
        return
    m.requests_compressed.inc()
    m.prompt_rows.inc(prompt_len * len(kept_per_layer))
    m.kept_rows.inc(sum(kept_per_layer))
    for child, kept in zip(m.layers, kept_per_layer):
        child.inc(kept)
    m.pool_rows_free.set(allocator.table.free_layer_rows())


def record_pool(allocator) -> None:
    if _metrics is not None:
        _metrics.pool_rows_free.set(allocator.table.free_layer_rows())
