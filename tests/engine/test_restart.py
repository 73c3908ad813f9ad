"""Restart under load: a server stopped by SIGTERM and started again on the same port loses
nothing it acknowledged as finished.

One real dkv server (``--kv-policy dynamickv``, small budget, the tiny random model) serves a
bounded load (40 requests from 8 concurrent clients, prompts of 20-1,500 tokens, a third of them
streaming). Part way through it is restarted twice, once per way an operator's SIGTERM reaches it:

1. ``kill <main pid>`` (docker / kubernetes / systemd ``KillMode=mixed``): SGLang drains. /health
   answers 503 at once, every request in flight (and any new one still sent) runs to its end, and
   the process exits once no request is left (its watchdog looks every 5 s; there is no deadline).
2. SIGTERM to the whole process group (systemd's default ``KillMode=control-group``, or
   ``kill -- -PGID``): SGLang drops. The scheduler child has no SIGTERM handler and dies at once,
   the parent sees a crashed child and kills the rest. A plain client sees the connection close
   with no response; a streaming client sees the chunked body end early, without a final chunk,
   without ``finish_reason`` and without ``[DONE]``. Nothing is marked finished that was not.

Clients (like a load balancer) stop sending new requests once the operator has begun the restart
and resend every failed request (connection error, incomplete stream, 5xx) to the new server. The
tests then check that every finished answer is complete, no request got two finished answers,
every request ends with exactly one, a sample equals the same requests run alone (after
``/flush_cache``, so they are radix-cache misses), and the last server's pool is back at idle once
the radix cache is flushed (the cache holds whole prompts' rows by design).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path

import aiohttp
import pytest
import requests

from bench.server import free_port

pytestmark = pytest.mark.engine

REQUESTS, CLIENTS, MAX_NEW, BUDGET = 40, 8, 32, 32
LENGTHS = (60, 200, 500, 1000, 1500)
# (requests finished on the current server before it is restarted, how SIGTERM is sent). Requests
# of one batch finish on the same step (ignore_eos, one max_new_tokens), so counts jump by ~8.
RESTARTS = ((4, "pid"), (4, "group"))
MAX_ATTEMPTS = 4


class RestartableServer:
    """``python -m dkv_sglang.launch_server`` on a fixed loopback port, stopped by SIGTERM."""

    def __init__(self, args: list[str], log_dir: Path, port: int):
        self.args, self.log_dir, self.port = list(args), Path(log_dir), port
        self.url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 300) -> float:
        t0 = time.time()
        self.starts += 1
        log = self.log_dir / f"server-{self.starts}.log"
        cmd = [sys.executable, "-m", "dkv_sglang.launch_server", *self.args,
               "--host", "127.0.0.1", "--port", str(self.port)]
        with open(log, "w") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited at start; see {log}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return time.time() - t0
            except requests.RequestException:
                pass
            if time.time() - t0 > timeout:
                self.kill()
                raise TimeoutError(f"server did not start in {timeout:.0f} s; see {log}")
            time.sleep(0.5)

    def stop(self, how: str = "pid", timeout: float = 120) -> dict:
        """SIGTERM to the main process (``pid``) or to its whole process group (``group``)."""
        t0 = time.time()
        if how == "pid":
            self.proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(self.proc.pid, signal.SIGTERM)
        health = None
        try:
            time.sleep(0.3)
            health = requests.get(self.url + "/health", timeout=5).status_code
        except requests.RequestException as e:
            health = type(e).__name__
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = "killed after timeout"
        self._reap_group()
        return {"how": how, "rc": rc, "exit_s": round(time.time() - t0, 1), "health_after_sigterm": health}

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()
        self._reap_group()

    def _reap_group(self, timeout: float = 30) -> None:
        # the children (scheduler, detokenizer) share the group; wait until none is alive
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                return
            except PermissionError:
                return
            time.sleep(0.2)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _plan():
    rng = random.Random(11)
    return [{"rid": f"restart-{i:03d}", "stream": i % 3 == 1,
             "ids": [rng.randrange(100, 40000) for _ in range(rng.choice(LENGTHS) - rng.randrange(40))]}
            for i in range(REQUESTS)]


def _body(req, stream, rid=None):
    return {"rid": rid or req["rid"], "input_ids": req["ids"], "stream": stream,
            "sampling_params": {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}}


def _finished(out) -> bool:
    reason = (out or {}).get("meta_info", {}).get("finish_reason")
    return isinstance(reason, dict) and reason.get("type") != "abort"


async def _attempt_plain(session, url, req) -> dict:
    """One non-streaming try. ``finished``: the server acknowledged the request as finished (a 200
    with a non-abort finish_reason). ``retry``: it failed in a way worth resending."""
    res = {"finished": False, "retry": True, "error": None, "out": None}
    try:
        async with session.post(url + "/generate", json=_body(req, False)) as r:
            res["status"] = r.status
            if r.status != 200:
                res.update(error=f"HTTP {r.status}: {(await r.text())[:200]}", retry=r.status >= 500)
                return res
            res["out"] = await r.json()
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as e:
        res["error"] = f"{type(e).__name__}: {e}"[:200]
        return res
    res["finished"] = _finished(res["out"])
    if not res["finished"]:
        res["error"] = f"200 without a finish_reason: {res['out'].get('meta_info')}"
    return res


async def _attempt_stream(session, url, req) -> dict:
    """One streaming try; keeps the chunks received before a transport error. ``finished``: the
    last chunk carries a non-abort finish_reason."""
    res = {"finished": False, "retry": True, "error": None, "out": None, "chunks": [], "done": False}
    try:
        async with session.post(url + "/generate", json=_body(req, True)) as r:
            res["status"] = r.status
            if r.status != 200:
                res.update(error=f"HTTP {r.status}: {(await r.text())[:200]}", retry=r.status >= 500)
                return res
            async for raw in r.content:
                line = raw.decode().strip()
                if line == "data: [DONE]":
                    res["done"] = True
                elif line.startswith("data:"):
                    chunk = json.loads(line[5:])
                    if "error" in chunk:
                        res["error"] = f"error chunk: {str(chunk)[:200]}"
                        break
                    res["chunks"].append(chunk)
    except (aiohttp.ClientError, TimeoutError, ConnectionError) as e:
        res["error"] = f"{type(e).__name__}: {e}"[:200]
    res["out"] = res["chunks"][-1] if res["chunks"] else None
    # finished only if the last chunk carries the finish_reason and no error chunk followed it
    res["finished"] = _finished(res["out"]) and not (res["error"] or "").startswith("error chunk")
    if not res["finished"] and res["error"] is None:
        res["error"] = "stream ended without a finish_reason"
    return res


async def _load(server: RestartableServer, plan):
    log = {req["rid"]: [] for req in plan}
    state = {"epoch": 1, "finished": 0, "in_flight": 0, "restarts": [], "clients_done": 0,
             "finished_by_epoch": {}}
    gate = asyncio.Event()
    gate.set()
    queue = list(reversed(plan))
    connector = aiohttp.TCPConnector(force_close=True)  # no kept-alive socket to a dead server
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=600)) as session:

        async def client():
            while queue:
                req = queue.pop()
                for attempt in range(MAX_ATTEMPTS):
                    await gate.wait()
                    epoch = state["epoch"]
                    state["in_flight"] += 1
                    t0 = time.time()
                    attempt_fn = _attempt_stream if req["stream"] else _attempt_plain
                    res = await attempt_fn(session, server.url, req)
                    state["in_flight"] -= 1
                    res.update(epoch=epoch, attempt=attempt, seconds=round(time.time() - t0, 2),
                               ended_in_epoch=state["epoch"], gate_open=gate.is_set())
                    log[req["rid"]].append(res)
                    if res["finished"]:
                        state["finished"] += 1
                        by_epoch = state["finished_by_epoch"]
                        by_epoch[epoch] = by_epoch.get(epoch, 0) + 1
                        break
                    if not res["retry"]:
                        break
                    await asyncio.sleep(0.2)

        async def client_then_count():
            await client()
            state["clients_done"] += 1

        async def operator():
            for after, how in RESTARTS:
                # under load: some requests finished on this server and most clients are waiting on it
                while not (state["finished_by_epoch"].get(state["epoch"], 0) >= after
                           and state["in_flight"] >= CLIENTS // 2):
                    if state["clients_done"] == CLIENTS:
                        return  # the load ran out first; test_both_restarts_happened_under_load says so
                    await asyncio.sleep(0.05)
                gate.clear()  # the load balancer stops routing new requests here
                in_flight, finished = state["in_flight"], state["finished"]
                info = await asyncio.to_thread(server.stop, how)
                info["start_s"] = round(await asyncio.to_thread(server.start), 1)
                info.update(in_flight=in_flight, finished_before=finished)
                state["restarts"].append(info)
                state["epoch"] += 1
                gate.set()

        t0 = time.time()
        await asyncio.gather(operator(), *(client_then_count() for _ in range(CLIENTS)))
        state["load_s"] = round(time.time() - t0, 1)
    return log, state


@pytest.fixture(scope="module")
def restart_run(tiny_model, tmp_path_factory):
    args = ["--model-path", tiny_model, "--kv-policy", "dynamickv", "--kv-budget", str(BUDGET),
            "--dtype", "float32", "--max-total-tokens", "24000", "--random-seed", "0"]
    log_dir = tmp_path_factory.mktemp("restart")
    plan = _plan()
    server = RestartableServer(args, log_dir, free_port())
    t0 = time.time()
    try:
        first_start = server.start()
        log, state = asyncio.run(_load(server, plan))
        finished = {rid: next(a for a in tries if a["finished"]) for rid, tries in log.items()
                    if any(a["finished"] for a in tries)}
        retried = [rid for rid, tries in log.items() if len(tries) > 1]
        on_first = [rid for rid, a in finished.items() if a["epoch"] == 1]
        sample = sorted(set(retried[:3] + on_first[:3] + [r["rid"] for r in plan[::9]]))
        by_rid = {r["rid"]: r for r in plan}
        _flush(server.url)
        alone = {rid: requests.post(server.url + "/generate", timeout=300,
                                    json=_body(by_rid[rid], False, rid=rid + "-alone")).json()
                 for rid in sample if rid in finished}
        _flush(server.url)
        stats = requests.get(server.url + "/dkv/stats", timeout=30).json()
        final_stop = server.stop("pid")
    finally:
        server.kill()
    state.update(first_start_s=round(first_start, 1), total_s=round(time.time() - t0, 1), final_stop=final_stop)
    print("\nrestart run:", json.dumps({k: v for k, v in state.items()}, default=str))
    for rid, tries in log.items():
        for a in tries:
            if a["error"]:
                print(f"  {rid} stream={by_rid[rid]['stream']} epoch={a['epoch']} try={a['attempt']}: {a['error']}")
    return plan, log, state, finished, alone, stats


def _flush(url: str, timeout: float = 60) -> None:
    """Empty the radix cache; SGLang refuses while a request still runs, so try until it takes."""
    deadline = time.time() + timeout
    while requests.post(url + "/flush_cache", timeout=30).status_code != 200:
        assert time.time() < deadline, "/flush_cache kept failing: a request never ended"
        time.sleep(0.5)


def _complete(req, out):
    meta = out["meta_info"]
    assert meta["id"] == req["rid"]
    assert meta["finish_reason"]["type"] == "length", (req["rid"], meta["finish_reason"])
    assert len(out["output_ids"]) == MAX_NEW == meta["completion_tokens"], req["rid"]
    assert isinstance(out["text"], str) and out["text"], req["rid"]
    assert meta["prompt_tokens"] == len(req["ids"])


def test_every_acknowledged_answer_is_complete(restart_run):
    plan, log, _, _, _, _ = restart_run
    for req in plan:
        for a in log[req["rid"]]:
            if not a["finished"]:
                continue
            _complete(req, a["out"])
            if req["stream"]:
                ids = [c["output_ids"] for c in a["chunks"]]
                texts = [c["text"] for c in a["chunks"]]
                # cumulative chunks: each extends the one before; only the last carries finish_reason
                assert all(n[: len(p)] == p for p, n in pairwise(ids)), req["rid"]
                assert all(n.startswith(p) for p, n in pairwise(texts)), req["rid"]
                assert all(c["meta_info"]["finish_reason"] is None for c in a["chunks"][:-1]), req["rid"]
                assert a["done"], f"{req['rid']}: finished stream without [DONE]"


def test_unfinished_tries_are_never_marked_finished(restart_run):
    plan, log, _, _, _, _ = restart_run
    for req in plan:
        for a in log[req["rid"]]:
            if a["finished"]:
                continue
            assert a["error"], req["rid"]
            if req["stream"] and a.get("chunks"):
                assert a["chunks"][-1]["meta_info"]["finish_reason"] is None, req["rid"]
                assert not a["done"], req["rid"]


def test_every_request_has_exactly_one_finished_answer(restart_run):
    plan, log, _, finished, _, _ = restart_run
    for req in plan:
        tries = log[req["rid"]]
        assert sum(a["finished"] for a in tries) == 1, (req["rid"], [a["error"] for a in tries])
        assert tries[-1]["finished"], "a client stops resending once it has a finished answer"
    assert set(finished) == {r["rid"] for r in plan}


def test_both_restarts_happened_under_load(restart_run):
    _, log, state, _, _, _ = restart_run
    assert len(state["restarts"]) == len(RESTARTS)
    assert all(r["in_flight"] > 0 for r in state["restarts"]), state["restarts"]
    epochs = {a["epoch"] for tries in log.values() for a in tries if a["finished"]}
    assert epochs == {1, 2, 3}, "each of the three servers finished some requests"


def test_sigterm_to_the_main_process_drains(restart_run):
    _, log, state, _, _, _ = restart_run
    drain = state["restarts"][0]
    assert drain["how"] == "pid" and drain["rc"] == 0 and drain["health_after_sigterm"] == 503, drain
    first = [a for tries in log.values() for a in tries if a["epoch"] == 1]
    assert all(a["finished"] for a in first), [a["error"] for a in first if not a["finished"]]


def test_requests_dropped_by_a_group_sigterm_are_resent_and_finished(restart_run):
    _, log, state, _, _, _ = restart_run
    assert state["restarts"][1]["how"] == "group"
    dropped = [(rid, a) for rid, tries in log.items() for a in tries if a["epoch"] == 2 and not a["finished"]]
    # the retry path is exercised: the group SIGTERM dropped what was in flight, and each of those
    # requests finished on the third server
    assert dropped, "nothing was in flight at the group SIGTERM; the retry path went untested"
    for rid, a in dropped:
        assert a["retry"], (rid, a["error"])
        assert log[rid][-1]["finished"] and log[rid][-1]["epoch"] == 3, rid


def test_a_sample_equals_the_same_requests_alone(restart_run):
    _, log, _, finished, alone, _ = restart_run
    assert len(alone) >= 6
    assert any(len(log[rid]) > 1 for rid in alone), "the sample holds a resent request"
    assert any(finished[rid]["epoch"] == 1 for rid in alone), "the sample holds a request the first server finished"
    for rid, out in alone.items():
        assert finished[rid]["out"]["output_ids"] == out["output_ids"], rid


def test_the_last_server_is_idle_afterwards(restart_run):
    *_, stats = restart_run
    assert stats["pool_rows_free"] == stats["pool_rows_total"]
    assert stats["kept_index_entries"] == 0
    assert stats["requests_compressed"] > 0
