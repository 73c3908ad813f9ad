"""Start ``python -m dkv_sglang.launch_server`` (or another server command) for a benchmark or a
test, wait for it, stop it cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process; ``with Server(args, log) as url:`` serves at ``url`` inside."""

    LAUNCHER = (sys.executable, "-m", "dkv_sglang.launch_server")

    def __init__(self, args: list[str], log_path: Path, start_timeout: float = 600,
                 launcher: tuple[str, ...] = LAUNCHER, env: dict[str, str] | None = None):
        """``launcher``: the command before ``args`` (e.g. ``sglang serve``); ``env``: the
        process environment (default: this one's)."""
        self.args = list(args)
        self.launcher = list(launcher)
        self.env = env
        self.log_path = Path(log_path)
        self.start_timeout = start_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        cmd = [*self.launcher, *self.args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=self.env)
        deadline = time.time() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                self.__exit__(None, None, None)
                raise RuntimeError(f"server exited at start; see {self.log_path}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return self.url
            except requests.RequestException:
                pass
            if time.time() > deadline:
                self.__exit__(None, None, None)
                raise TimeoutError(f"server did not start in {self.start_timeout:.0f} s; see {self.log_path}")
            time.sleep(1)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()


def stats(url: str) -> dict:
    return requests.get(url + "/dkv/stats", timeout=60).json()
