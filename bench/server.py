"""Start ``python -m dkv_sglang.launch_server`` (or another server command) for a benchmark or a
test, wait for it, stop it cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import requests


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process; ``with Server(args, log) as url:`` serves at ``url`` inside.

    A server that is alive but not healthy after ``start_timeout`` seconds is stopped and started
    once more on a fresh port (``retries``); its log's tail is printed, so the hang is on record.
    A server that exits at start is not retried. Errors quote the log's tail."""

    LAUNCHER = (sys.executable, "-m", "dkv_sglang.launch_server")

    def __init__(self, args: list[str], log_path: Path, start_timeout: float = 300, retries: int = 1,
                 launcher: tuple[str, ...] = LAUNCHER, env: dict[str, str] | None = None):
        """``launcher``: the command before ``args`` (e.g. ``sglang serve``); ``env``: the
        process environment (default: this one's)."""
        self.args = list(args)
        self.launcher = list(launcher)
        self.env = env
        self.log_path = Path(log_path)
        self.start_timeout = start_timeout
        self.retries = retries
        self.proc: subprocess.Popen | None = None
        self._log = None
        self._new_port()

    def _new_port(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> str:
        for attempt in range(self.retries + 1):
            try:
                return self._start()
            except TimeoutError as e:
                if attempt == self.retries:
                    raise
                print(f"{e}; starting it again on a fresh port", file=sys.stderr, flush=True)
                warnings.warn(f"{e}; started again on a fresh port", stacklevel=2)  # in pytest's summary
                self.log_path = self.log_path.with_name(f"{self.log_path.stem}.retry{attempt + 1}{self.log_path.suffix}")
                self._new_port()
        raise AssertionError("unreachable")

    def _start(self) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "w")
        cmd = [*self.launcher, *self.args, "--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=self.env)
        deadline = time.time() + self.start_timeout
        while True:
            if self.proc.poll() is not None:
                self.__exit__(None, None, None)
                raise RuntimeError(f"server exited at start; {self.log_path} ends:\n{log_tail(self.log_path)}")
            try:
                if requests.get(self.url + "/health", timeout=5).status_code == 200:
                    return self.url
            except requests.RequestException:
                pass
            if time.time() > deadline:
                self.__exit__(None, None, None)
                raise TimeoutError(f"server did not start in {self.start_timeout:.0f} s; {self.log_path} ends:\n"
                                   f"{log_tail(self.log_path)}")
            time.sleep(1)

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self._log is not None:
            self._log.close()


def log_tail(path: Path, chars: int = 4000) -> str:
    """The last ``chars`` characters of a log file ('' if there is none)."""
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def stats(url: str) -> dict:
    return requests.get(url + "/dkv/stats", timeout=60).json()
