"""Benchmarks: ``bench.quality`` (accuracy per policy and budget), ``bench.throughput`` (requests
per GB at equal KV memory), ``bench.gpu_check`` (the FlashInfer path on a GPU)."""
