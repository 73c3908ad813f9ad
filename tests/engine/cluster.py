"""Real processes on loopback for the scaling-out tests: dkv workers and SGLang's router.

``Worker`` runs ``python -m dkv_sglang.launch_server``; ``Router`` runs
``python -m sglang_router.launch_router`` in front of workers. Both start in their own process
group, so a test can kill a worker outright (SIGKILL to the group) and the fixtures can always
clean up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import requests

from bench.server import free_port, log_tail


class Process:
    """A command in its own process group, its output in ``log``."""

    def __init__(self, cmd: list[str], log: Path, env: dict | None = None):
        self.log = Path(log)
        self._out = open(self.log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
                                     env={**os.environ, **(env or {})})

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to the whole group and wait (SIGTERM: up to 60 s, then SIGKILL)."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
            except ProcessLookupError:
                pass
        self._out.close()

    def wait_until(self, ready, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while True:
            if not self.alive():
                raise RuntimeError(f"{what} exited at start; {self.log} ends:\n{log_tail(self.log)}")
            try:
                if ready():
                    return
            except (requests.RequestException, ValueError, KeyError):
                pass
            if time.time() > deadline:
                raise TimeoutError(f"{what} not ready in {timeout:.0f} s; {self.log} ends:\n{log_tail(self.log)}")
            time.sleep(1)


class Worker(Process):
    def __init__(self, args: list[str], log: Path, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([sys.executable, "-m", "dkv_sglang.launch_server", *args,
                          "--host", "127.0.0.1", "--port", str(self.port)], log, env)

    def wait_ready(self, timeout: float = 600) -> None:
        self.wait_until(lambda: requests.get(self.url + "/health", timeout=5).status_code == 200, timeout, "worker")

    def stats(self) -> dict:
        return requests.get(self.url + "/dkv/stats", timeout=60).json()


class Router(Process):
    def __init__(self, workers: list[str], log: Path, *extra: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__([sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
                          "--port", str(self.port), "--prometheus-port", str(free_port()),
                          "--worker-urls", *workers, *extra], log)
        self.workers = workers

    def wait_ready(self, timeout: float = 120) -> None:
        """The router answers /health before it has registered its workers: wait until it lists
        them all healthy and a request through it is answered."""

        def ready() -> bool:
            listed = requests.get(self.url + "/workers", timeout=5).json()["workers"]
            if sorted(w["url"] for w in listed if w["is_healthy"]) != sorted(self.workers):
                return False
            body = {"text": "ready?", "sampling_params": {"max_new_tokens": 1}}
            return requests.post(self.url + "/generate", json=body, timeout=60).status_code == 200

        self.wait_until(ready, timeout, "router")


def idle(stats: dict) -> bool:
    """Nothing held for a request: every row is free or held by the prefix cache alone."""
    free = stats["pool_rows_free"] + stats["pool_rows_cached"]
    entries = stats.get("kept_index_entries", 0)  # a compressing server's index holds no request
    return stats["running_requests"] == 0 and free == stats["pool_rows_total"] and entries == 0
