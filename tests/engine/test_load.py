"""A bounded load test on loopback: 200 requests from 32 concurrent clients, mixed prompt
lengths, policies and budgets, some streaming, some abandoned mid-stream. Every request gets its
own complete answer, none is lost or duplicated, a sample equals the same requests run alone,
and the pool is back at idle afterwards."""

from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import pytest
import requests

from bench.server import Server

pytestmark = pytest.mark.engine

REQUESTS, CLIENTS, MAX_NEW = 200, 32, 16
LENGTHS = (100, 300, 800, 1500, 2500, 4000)
CUSTOM = ({}, {"kv_budget": 32}, {"kv_policy": "snapkv", "kv_budget": 48},
          {"kv_policy": "streamingllm", "kv_budget": 32}, {"kv_policy": "pyramidkv", "kv_budget": 64},
          {"kv_policy": "full"})


def _plan():
    # rids of equal width: SGLang aborts every request whose rid *starts with* an aborted one's
    rng = random.Random(7)
    plan = []
    for i in range(REQUESTS):
        n = rng.choice(LENGTHS) - rng.randrange(50)
        kind = "abort" if i % 20 == 3 else "stream" if i % 5 == 1 else "plain"
        plan.append({"rid": f"load-{i:03d}", "ids": [rng.randrange(100, 40000) for _ in range(n)],
                     "custom": rng.choice(CUSTOM), "kind": kind})
    return plan


def _body(req, stream):
    return {"rid": req["rid"], "input_ids": req["ids"], "stream": stream,
            "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True,
                                "custom_params": req["custom"]}}


async def _send(session, url, req):
    if req["kind"] == "plain":
        async with session.post(url + "/generate", json=_body(req, False)) as r:
            return r.status, await r.json()
    last = None
    async with session.post(url + "/generate", json=_body(req, True)) as r:
        async for raw in r.content:
            line = raw.decode().strip()
            if line.startswith("data:") and line != "data: [DONE]":
                last = json.loads(line[5:])
                if req["kind"] == "abort":
                    return "aborted", last  # leave after the first chunk
        return r.status, last


async def _load(url, plan):
    limit = asyncio.Semaphore(CLIENTS)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:

        async def one(req):
            async with limit:
                return await _send(session, url, req)

        return await asyncio.gather(*(one(r) for r in plan))


@pytest.fixture(scope="module")
def load_run(tiny_model, tmp_path_factory):
    args = ["--model-path", tiny_model, "--kv-policy", "dynamickv", "--kv-budget", "64", "--dtype", "float32",
            "--max-total-tokens", "40000", "--random-seed", "0"]
    plan = _plan()
    with Server(args, tmp_path_factory.mktemp("load") / "server.log") as url:
        results = asyncio.run(_load(url, plan))
        sample = [r for r in plan if r["kind"] == "plain"][::20]
        alone = [requests.post(url + "/generate", json=_body({**r, "rid": r["rid"] + "-alone"}, False), timeout=300).json()
                 for r in sample]
        stats = requests.get(url + "/dkv/stats", timeout=30).json()
    return plan, results, sample, alone, stats


def test_every_request_gets_its_own_complete_answer(load_run):
    plan, results, _, _, _ = load_run
    answered = set()
    for req, (status, out) in zip(plan, results):
        if req["kind"] == "abort":
            assert status == "aborted"
            continue
        assert status == 200, (req["rid"], out)
        assert out["meta_info"]["id"] == req["rid"]
        assert len(out["output_ids"]) == MAX_NEW, req["rid"]
        answered.add(out["meta_info"]["id"])
    assert len(answered) == sum(r["kind"] != "abort" for r in plan), "no answer lost or duplicated"


def test_a_sample_equals_the_same_requests_alone(load_run):
    plan, results, sample, alone, _ = load_run
    by_rid = {req["rid"]: out for req, (_, out) in zip(plan, results)}
    assert len(sample) >= 5
    for req, out in zip(sample, alone):
        assert by_rid[req["rid"]]["output_ids"] == out["output_ids"], req["rid"]


def test_load_ran_concurrently_and_left_nothing_behind(load_run):
    _, _, _, _, stats = load_run
    assert stats["peak_running_requests"] >= 8
    assert stats["requests_compressed"] > 100
    assert stats["pool_rows_free"] + stats["pool_rows_cached"] == stats["pool_rows_total"]
