"""The host work of serving, counted (bench/host_cost.py): a decode step's metadata does a
fixed number of ATen ops whatever the batch and never waits for the device; compressing a
prefill batch does a number of ops that depends neither on the prompt length nor (but for a few
per request) on the batch, and reads the device at most four times per batch. An 8B model's
shape: 32 layers, 8 KV heads, budget 128. Counts, never wall time."""

import pytest

from bench import host_cost as hc

L, H, BUDGET = 32, 8, 128


@pytest.fixture(scope="module", autouse=True)
def _sglang_cpu():
    from dkv_sglang import machine

    machine.prepare()


def _decode(batch):
    w = hc.decode_world(batch, L, H, BUDGET, prompt=4096)
    hc.decode_step(w)
    with hc.OpCounter() as c:
        hc.decode_step(w)
    return c


def _compress(tokens, requests):
    w = hc.compress_world(tokens, requests, L, H, BUDGET)
    with hc.OpCounter() as c:
        hc.compress(w)
    assert all(j.req.customized_info["kv_prompt_tokens"] == tokens for j in w.jobs), "every request was cut"
    return c


def test_decode_metadata_is_flat_in_the_batch_and_sync_free():
    counts = {b: _decode(b) for b in (1, 32, 256)}
    for b, c in counts.items():
        assert c.sync_ops == 0, (b, c.syncs)
    assert counts[256].ops <= 1.2 * counts[1].ops, {b: c.ops for b, c in counts.items()}
    assert counts[256].ops / L <= 16, "ATen ops per layer"


def test_compressing_a_batch_costs_ops_per_batch_and_at_most_four_syncs():
    one_short, one_long = _compress(512, 1), _compress(2048, 1)
    many = _compress(512, 8)
    assert one_short.ops == one_long.ops, "independent of the prompt length"
    assert many.ops <= 1.2 * one_short.ops, (one_short.ops, many.ops)
    for c in (one_short, one_long, many):
        assert c.sync_ops <= 4, c.syncs


def test_the_counter_sees_a_sync():
    import torch

    x = torch.arange(10)
    with hc.OpCounter() as c:
        (x > 3).nonzero()
        x[x > 5].sum()
        x.tolist()
        y = x.cpu()
        y.tolist()  # a host copy: free
    assert c.sync_ops == 4, c.syncs
