"""The real HTTP server from ``python -m dkv_sglang.launch_server``: SGLang's API plus /dkv/stats."""

from __future__ import annotations

import threading
import time

import pytest
import requests

from bench.server import Server

from .conftest import TINY_LAYERS

pytestmark = pytest.mark.engine

BUDGET = 32
MAX_NEW = 400


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    args = ["--model-path", tiny_model, "--kv-policy", "dynamickv", "--kv-budget", str(BUDGET),
            "--dtype", "float32", "--max-total-tokens", "16384"]
    with Server(args, tmp_path_factory.mktemp("server") / "server.log") as url:
        yield url


def test_stats_fields(server):
    stats = requests.get(server + "/dkv/stats", timeout=30).json()
    for key in ("policy", "budget", "num_layers", "pool_rows_total", "pool_rows_free", "requests_compressed", "recent"):
        assert key in stats
    assert stats["policy"] == "dynamickv" and stats["budget"] == BUDGET and stats["num_layers"] == TINY_LAYERS


def test_rows_are_freed_while_the_request_runs(server, prompts):
    L = TINY_LAYERS
    idle = requests.get(server + "/dkv/stats", timeout=30).json()
    assert idle["pool_rows_free"] + idle["pool_rows_cached"] == idle["pool_rows_total"]
    prompt = prompts[0]
    body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0,
                                                      "ignore_eos": True}}
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=requests.post(server + "/generate", json=body, timeout=300)))
    worker.start()
    seen = None
    while worker.is_alive():  # poll until the request is compressed and still decoding
        stats = requests.get(server + "/dkv/stats", timeout=30).json()
        if stats["requests_compressed"] > idle["requests_compressed"] and stats["running_requests"] > 0:
            seen = stats
            break
        time.sleep(0.02)
    worker.join()
    assert result["r"].status_code == 200
    assert seen is not None, "the request ended before a stats poll caught it in flight"
    mine = seen["recent"][-1]
    assert mine["prompt_tokens"] == len(prompt)
    kept = sum(mine["kept_per_layer"])
    assert kept == BUDGET * L
    # In flight: the request holds its kept rows plus L rows per generated token, nothing else
    # (the prefix cache keeps the whole prompt, evictable: "cached").
    held = idle["pool_rows_total"] - seen["pool_rows_free"] - seen["pool_rows_cached"] - kept
    assert held % L == 0 and 0 <= held // L <= MAX_NEW, (held, L)
    after = requests.get(server + "/dkv/stats", timeout=30).json()
    assert after["pool_rows_free"] + after["pool_rows_cached"] == after["pool_rows_total"]


def test_openai_chat_route_works(server):
    body = {"model": "default", "messages": [{"role": "user", "content": "Say hello. " * 40}],
            "max_tokens": 8, "temperature": 0}
    r = requests.post(server + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200
    out = r.json()
    assert out["choices"][0]["message"]["content"] is not None
    assert out["usage"]["prompt_tokens"] > BUDGET
    assert requests.get(server + "/dkv/stats", timeout=30).json()["requests_compressed"] >= 2


def test_bad_request_is_a_400(server):
    r = requests.post(server + "/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": -3}}, timeout=60)
    assert r.status_code == 400 and r.text


@pytest.mark.parametrize(
    "custom, reason",
    [
        ({"kv_budget": 0}, "custom_params.kv_budget"),
        ({"kv_budget": "64"}, "custom_params.kv_budget"),
        ({"kv_policy": "h2o"}, "custom_params.kv_policy"),
        ({"kv_windw": 4}, "custom_params.kv_windw"),
        ({"kv_allocation": "greedy"}, "custom_params.kv_allocation"),
        ({"kv_head_budgets": "ada"}, "custom_params.kv_head_budgets"),
    ],
)
def test_bad_kv_custom_params_are_a_400_with_the_reason(server, custom, reason):
    body = {"text": "hi " * 50, "sampling_params": {"max_new_tokens": 4, "custom_params": custom}}
    r = requests.post(server + "/generate", json=body, timeout=60)
    assert r.status_code == 400 and reason in r.text


def test_openai_route_takes_a_per_request_policy(server):
    before = requests.get(server + "/dkv/stats", timeout=30).json()["requests_compressed"]
    body = {"model": "default", "prompt": "count with me " * 30, "max_tokens": 4, "temperature": 0,
            "custom_params": {"kv_policy": "streamingllm", "kv_budget": 16}}
    r = requests.post(server + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    stats = requests.get(server + "/dkv/stats", timeout=30).json()
    assert stats["requests_compressed"] == before + 1
    assert stats["recent"][-1]["kept_per_layer"] == [16] * TINY_LAYERS
