"""Benchmarks (quality: issue 4, throughput: issue 5). Nothing here yet."""
