"""A streaming load client for SGLang's ``/generate``: one request stream, measured per request.

Sends every request at once (or at most ``concurrency`` at a time), reads the token stream, and
records time to first token, the gaps between tokens, and the end-to-end latency. While the
load runs it polls ``/dkv/stats`` for the number of running requests (the peak concurrency).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field

import aiohttp
from tqdm import tqdm


@dataclass(frozen=True)
class Request:
    input_ids: list[int]
    max_new_tokens: int
    custom_params: dict | None = None


@dataclass
class Result:
    prompt_tokens: int
    ok: bool = False
    error: str = ""
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itls: list[float] = field(default_factory=list)


async def _one(session, url: str, req: Request, bar) -> Result:
    params = {"max_new_tokens": req.max_new_tokens, "temperature": 0, "ignore_eos": True}
    if req.custom_params:
        params["custom_params"] = req.custom_params
    body = {"input_ids": req.input_ids, "sampling_params": params, "stream": True}
    res = Result(prompt_tokens=len(req.input_ids))
    start = last = time.perf_counter()
    seen = 0
    try:
        async with session.post(url + "/generate", json=body) as resp:
            if resp.status != 200:
                res.error = f"HTTP {resp.status}: {(await resp.text())[:200]}"
                return res
            async for raw in resp.content:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[5:])
                if "error" in chunk:
                    res.error = str(chunk["error"])[:200]
                    return res
                done = chunk["meta_info"]["completion_tokens"]
                now = time.perf_counter()
                if done > seen:
                    if seen == 0:
                        res.ttft = now - start
                    else:
                        res.itls.extend([(now - last) / (done - seen)] * (done - seen))
                    seen, last = done, now
        res.output_tokens = seen
        res.latency = time.perf_counter() - start
        res.ok = seen == req.max_new_tokens
        if not res.ok:
            res.error = f"{seen} of {req.max_new_tokens} tokens"
    except aiohttp.ClientError as e:
        res.error = repr(e)
    finally:
        bar.update(1)
    return res


async def _poll_running(session, url: str, peak: list[int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with session.get(url + "/dkv/stats") as resp:
                peak[0] = max(peak[0], (await resp.json())["running_requests"])
        except (aiohttp.ClientError, KeyError):
            pass
        try:
            await asyncio.wait_for(stop.wait(), 0.25)
        except TimeoutError:
            pass


async def _run(url, reqs, concurrency, desc):
    limit = asyncio.Semaphore(concurrency or len(reqs))
    timeout = aiohttp.ClientTimeout(total=None, sock_read=3600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        peak, stop = [0], asyncio.Event()
        poller = asyncio.create_task(_poll_running(session, url, peak, stop))
        with tqdm(total=len(reqs), desc=desc, unit="req", leave=False) as bar:

            async def limited(r):
                async with limit:
                    return await _one(session, url, r, bar)

            start = time.perf_counter()
            results = await asyncio.gather(*(limited(r) for r in reqs))
            duration = time.perf_counter() - start
        stop.set()
        await poller
    return results, duration, peak[0]


def run(url: str, reqs: list[Request], concurrency: int | None = None, desc: str = "requests"):
    """Send ``reqs``; return (results in order, wall seconds, peak running requests seen)."""
    return asyncio.run(_run(url, reqs, concurrency, desc))
