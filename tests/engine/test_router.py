"""SGLang's router (``sglang-router``, ``--policy cache_aware``) in front of two dkv workers.

Real processes on loopback: two ``python -m dkv_sglang.launch_server`` workers (tiny random
Llama, DynamicKV budget 32) and ``python -m sglang_router.launch_router``. Checked: a follow-up
on a document reaches the worker holding it and keeps what a miss keeps; per-request
``kv_policy`` / ``kv_budget`` reach the worker in the fields the router forwards, and bad values
are still a 400 naming the field; a burst is answered completely by both workers;
``python -m dkv_sglang.stats`` sums the workers; and, last, one worker killed mid-run: nothing
answered is wrong, new requests go to the survivor, and the survivor is idle afterwards.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from .cluster import Router, Worker, idle
from .conftest import TINY_LAYERS

pytestmark = pytest.mark.engine

BUDGET, L = 32, TINY_LAYERS
WORKER_ARGS = ["--kv-policy", "dynamickv", "--kv-budget", str(BUDGET), "--dtype", "float32",
               "--max-total-tokens", "32768", "--log-level", "warning"]
# Fast failure detection for the failover test (the default interval is 60 s). SGLang's /health
# runs a one-token generation per call (and answers 503 after 20 s without progress): checked
# every second on a loaded machine that piles up requests and flaps workers, so the workers' /health
# only says the process is up (SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION=0); a killed worker refuses it.
WORKER_ENV = {"SGLANG_ENABLE_HEALTH_ENDPOINT_GENERATION": "0"}
ROUTER_ARGS = ["--policy", "cache_aware", "--health-check-interval-secs", "1", "--health-failure-threshold", "2",
               "--log-level", "warn"]


@pytest.fixture(scope="module")
def cluster(tiny_model, tmp_path_factory):
    logs = tmp_path_factory.mktemp("router")
    workers = [Worker(["--model-path", tiny_model, *WORKER_ARGS], logs / f"worker{i}.log", WORKER_ENV)
               for i in range(2)]
    router = None
    try:
        for w in workers:
            w.wait_ready()
        router = Router([w.url for w in workers], logs / "router.log", *ROUTER_ARGS)
        router.wait_ready()
        yield router, workers
        for w in workers:  # nothing held on a worker that is still up
            if w.alive():
                assert _wait(lambda w=w: idle(w.stats())), w.stats()
    finally:
        if router is not None:
            router.kill()
        for w in workers:
            w.kill()


def _wait(cond, timeout: float = 60) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return True
        time.sleep(0.2)
    return False


def _ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(100, 40000) for _ in range(n)]


def _generate(url: str, ids: list[int], max_new: int = 8, **extra) -> requests.Response:
    sampling = {"max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}
    sampling.update(extra.pop("sampling", {}))
    body = {"input_ids": ids, "sampling_params": sampling, **extra}
    return requests.post(url + "/generate", json=body, timeout=900)


def _served_by(workers, rid: str) -> list[int]:
    """Which workers' recent compressed requests include ``rid``."""
    return [i for i, w in enumerate(workers) if w.alive() and any(r["rid"] == rid for r in w.stats()["recent"])]


def test_follow_up_reaches_the_worker_holding_the_document(cluster):
    router, workers = cluster
    rng = random.Random(1)
    doc = _ids(rng, 1200)
    first = _generate(router.url, doc + _ids(rng, 30))
    assert first.status_code == 200, first.text
    [home] = _served_by(workers, first.json()["meta_info"]["id"])
    follow = doc + _ids(rng, 30)
    hit = _generate(router.url, follow)
    assert hit.status_code == 200, hit.text
    meta = hit.json()["meta_info"]
    assert _served_by(workers, meta["id"]) == [home]
    assert meta["cached_tokens"] >= len(doc)  # the whole document came from the worker's cache
    # A miss on the other worker keeps the same rows and answers the same tokens.
    miss = _generate(workers[1 - home].url, follow)
    assert miss.json()["meta_info"]["cached_tokens"] == 0
    assert miss.json()["meta_info"]["kv_kept_per_layer"] == meta["kv_kept_per_layer"]
    assert miss.json()["output_ids"] == hit.json()["output_ids"]


def test_the_router_drops_custom_params_it_has_no_field_for(cluster):
    """Why the other fields exist: sampling_params.custom_params does not survive the router."""
    router, _ = cluster
    r = _generate(router.url, _ids(random.Random(2), 300), sampling={"custom_params": {"kv_budget": 16}})
    assert sum(r.json()["meta_info"]["kv_kept_per_layer"]) == BUDGET * L  # the server's budget, not 16


def test_generate_takes_kv_params_in_custom_labels(cluster):
    router, _ = cluster
    ids = _ids(random.Random(3), 300)
    r = _generate(router.url, ids, custom_labels={"kv_budget": "16", "kv_policy": "snapkv", "team": "a"})
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["kv_kept_per_layer"] == [16] * L
    r = _generate(router.url, ids, custom_labels={"kv_policy": "full"})
    assert "kv_kept_per_layer" not in r.json()["meta_info"]


def test_openai_routes_take_kv_params_through_the_router(cluster):
    router, _ = cluster
    chat = {"model": "default", "messages": [{"role": "user", "content": "tell me more " * 60}], "max_tokens": 4,
            "temperature": 0, "metadata": {"kv_budget": "20", "kv_policy": "pyramidkv"}}
    r = requests.post(router.url + "/v1/chat/completions", json=chat, timeout=300)
    assert r.status_code == 200, r.text
    kept = r.json()["metadata"]["kv_kept_per_layer"]
    assert len(kept) == 1 and sum(kept[0]) == 20 * L and len(set(kept[0])) > 1  # pyramid: uneven layers
    completion = {"model": "default", "prompt": "count with me " * 60, "max_tokens": 4, "temperature": 0,
                  "custom_params": {"kv_policy": "snapkv", "kv_budget": 16}}  # completions pass whole
    r = requests.post(router.url + "/v1/completions", json=completion, timeout=300)
    assert r.status_code == 200, r.text
    assert r.json()["metadata"]["kv_kept_per_layer"] == [[16] * L]


@pytest.mark.parametrize(
    "route, body, reason",
    [
        ("/generate", {"text": "hi " * 50, "custom_labels": {"kv_budget": "6x"}}, "custom_labels.kv_budget"),
        ("/generate", {"text": "hi " * 50, "custom_labels": {"kv_policy": "h2o"}}, "custom_labels.kv_policy"),
        ("/generate", {"text": "hi " * 50, "custom_labels": {"kv_budget": "4"}}, "custom_labels.kv_budget"),
        ("/generate", {"text": "hi " * 50, "custom_labels": {"kv_windw": "4"}}, "custom_labels.kv_windw"),
        ("/v1/chat/completions", {"model": "default", "messages": [{"role": "user", "content": "hi " * 50}],
                                  "metadata": {"kv_budget": "0"}}, "metadata.kv_budget"),
        ("/v1/completions", {"model": "default", "prompt": "hi " * 50, "metadata": {"kv_policy": "h2o"}},
         "metadata.kv_policy"),
    ],
)
def test_bad_kv_params_through_the_router_are_a_400_with_the_reason(cluster, route, body, reason):
    router, _ = cluster
    r = requests.post(router.url + route, json=body, timeout=120)
    assert r.status_code == 400 and reason in r.text, (r.status_code, r.text)


def test_a_burst_is_answered_completely_by_both_workers(cluster):
    router, workers = cluster
    rng = random.Random(4)
    prompts = [_ids(rng, rng.randrange(200, 900)) for _ in range(16)]
    with ThreadPoolExecutor(16) as pool:
        outs = list(pool.map(lambda p: _generate(router.url, p, max_new=16), prompts))
    assert all(r.status_code == 200 for r in outs), [r.text for r in outs if r.status_code != 200]
    assert all(len(r.json()["output_ids"]) == 16 for r in outs)
    homes = [_served_by(workers, r.json()["meta_info"]["id"]) for r in outs]
    assert all(len(h) == 1 for h in homes)
    per_worker = [sum(h == [i] for h in homes) for i in range(2)]
    print(f"burst: requests per worker {per_worker}")
    assert min(per_worker) > 0, per_worker


def test_stats_cli_sums_the_workers_behind_the_router(cluster):
    router, workers = cluster
    _wait(lambda: all(w.stats()["running_requests"] == 0 for w in workers))
    out = subprocess.run([sys.executable, "-m", "dkv_sglang.stats", "--json", router.url],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    view = json.loads(out.stdout)
    each = [w.stats() for w in workers]
    assert sorted(view["workers"]) == sorted(w.url for w in workers)
    for key in ("requests_compressed", "pool_rows_total"):
        assert view["total"][key] == sum(s[key] for s in each)
    assert view["total"]["requests_compressed"] >= 16
    table = subprocess.run([sys.executable, "-m", "dkv_sglang.stats", *(w.url for w in workers)],
                           capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "total (2 up)" in table.stdout, table.stdout
    print(table.stdout)


def test_a_worker_killed_mid_run(cluster):
    """Kill a worker that is serving (SIGKILL, its whole process group) while both take a load.
    Every answer that arrives is complete and equals the same request served alone by the
    survivor; requests sent after the router has noticed all go to the survivor."""
    router, workers = cluster
    rng = random.Random(5)
    prompts = [_ids(rng, rng.randrange(200, 600)) for _ in range(16)]
    max_new = 48

    def send(p):
        try:
            return _generate(router.url, p, max_new=max_new)
        except requests.RequestException as e:
            return e

    def serving() -> list[int]:
        return [i for i, w in enumerate(workers) if w.stats()["running_requests"] > 0]

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(send, p) for p in prompts]
        assert _wait(lambda: len(serving()) > 0, timeout=120), "no worker got a request"
        busy = serving()
        victim = busy[-1]  # worker 1 if both serve
        survivor = 1 - victim
        at_kill = workers[victim].stats()["running_requests"]
        workers[victim].kill()
        outs = [f.result() for f in futures]
    ok = [(p, r) for p, r in zip(prompts, outs) if isinstance(r, requests.Response) and r.status_code == 200]
    failed = [r if isinstance(r, Exception) else f"{r.status_code} {r.text[:200]}" for r in outs
              if not (isinstance(r, requests.Response) and r.status_code == 200)]
    by_survivor = sum(_served_by(workers, r.json()["meta_info"]["id"]) == [survivor] for _, r in ok)
    print(f"failover: {at_kill} running on the killed worker; {len(ok)} of {len(prompts)} answered "
          f"({by_survivor} by the survivor, {len(ok) - by_survivor} by the killed worker before the kill); "
          f"{len(failed)} failed: {failed[:3]}")
    with ThreadPoolExecutor(16) as pool:  # nothing answered is wrong: the survivor's own answers
        alone = list(pool.map(lambda p: _generate(workers[survivor].url, p, max_new=max_new), [p for p, _ in ok]))
    for (p, r), ref in zip(ok, alone):
        assert len(r.json()["output_ids"]) == max_new
        assert r.json()["output_ids"] == ref.json()["output_ids"]
    # The router notices: new requests are all answered, by the survivor.
    assert _wait(lambda: [w["url"] for w in requests.get(router.url + "/workers", timeout=5).json()["workers"]
                          if w["is_healthy"]] == [workers[survivor].url], timeout=60)
    fresh = [_generate(router.url, _ids(rng, 300)) for _ in range(4)]
    assert all(r.status_code == 200 for r in fresh), [r.text for r in fresh]
    assert all(_served_by(workers, r.json()["meta_info"]["id"]) == [survivor] for r in fresh)
    out = subprocess.run([sys.executable, "-m", "dkv_sglang.stats", *(w.url for w in workers)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "DOWN" in out.stdout and "total (1 up)" in out.stdout, out.stdout
