"""`make serve` picks its dtype from the CPU: bfloat16 only where the CPU has bfloat16 instructions."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def serve_dtype(*make_args: str) -> str:
    """The --dtype `make serve` would pass (`make -n` prints the commands without running them)."""
    out = subprocess.run(["make", "-n", "serve", *make_args], cwd=ROOT, capture_output=True, text=True, check=True)
    text = out.stdout.replace("\\\n", " ")  # join the recipe's continued lines
    (line,) = [l for l in text.splitlines() if "dkv_sglang.launch_server" in l]
    return re.search(r"--dtype (\S+)", line).group(1)


@pytest.mark.parametrize(("flags", "dtype"), [
    ("fpu sse4_2 avx2 fma", "float32"),           # AVX2 only: no bfloat16 instructions
    ("avx2 avx512f avx512_bf16", "bfloat16"),
    ("avx2 avx512f amx_bf16 amx_tile", "bfloat16"),
    ("avx2 avx512_bf16x", "float32"),             # a whole flag, not a prefix
])
def test_dtype_follows_the_cpu_flags(tmp_path, flags, dtype):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert serve_dtype(f"CPUINFO={cpuinfo}") == dtype


def test_dtype_can_be_set(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("flags\t\t: avx2\n")
    assert serve_dtype(f"CPUINFO={cpuinfo}", "DTYPE=bfloat16") == "bfloat16"
