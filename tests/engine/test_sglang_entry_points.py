"""SGLang's own commands take our flags: ``sglang serve`` and ``python -m sglang.launch_server``.

Real processes on the tiny model, one server at a time (each fixture starts its server, asks
the same greedy requests, stops it): ``sglang serve --kv-policy dynamickv`` compresses and
serves what ``python -m dkv_sglang.launch_server`` serves; without our flags SGLang's command
is vanilla (same tokens as ``--kv-policy full``, no ``/dkv/stats``); bad flags exit 2.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
import torch

from bench.server import Server
from dkv_sglang.cli import FLAGS

from .conftest import SAMPLING, TINY_LAYERS

pytestmark = pytest.mark.engine

SGLANG_SERVE = (str(Path(sys.executable).parent / "sglang"), "serve")
SGLANG_LAUNCH = (sys.executable, "-m", "sglang.launch_server")
DKV_LAUNCH = (sys.executable, "-m", "dkv_sglang.launch_server")
CPU_ENV = {**os.environ, "SGLANG_USE_CPU_ENGINE": "1"}
COMMON = ["--dtype", "float32", "--max-total-tokens", "16384", "--random-seed", "0"]
BUDGET = 32
DKV = ["--kv-policy", "dynamickv", "--kv-budget", str(BUDGET)]
# What SGLang's CPU path needs, given by hand to a vanilla command (the plugin adds it with our flags).
CPU_FLAGS = ["--device", "cpu", "--attention-backend", "torch_native", "--mem-fraction-static", "0.3"]


def _serve(launcher, args, log: Path, prompts) -> dict:
    """Start the server, generate greedily for each prompt alone, return what it answered."""
    with Server([*args, *COMMON], log, launcher=launcher, env=CPU_ENV) as url:
        out = {"tokens": [], "kept": [], "stats": None}
        for prompt in prompts:
            body = {"input_ids": prompt, "sampling_params": SAMPLING}
            r = requests.post(url + "/generate", json=body, timeout=300)
            assert r.status_code == 200, r.text
            out["tokens"].append(r.json()["output_ids"])
            out["kept"].append(r.json()["meta_info"].get("kv_kept_per_layer"))
        r = requests.get(url + "/dkv/stats", timeout=60)
        out["stats"] = r.json() if r.status_code == 200 else r.status_code
        out["launch_command"] = requests.get(url + "/server_info", timeout=60).json().get("launch_command")
        return out


@pytest.fixture(scope="module")
def sglang_serve_dkv(tiny_model, prompts, tmp_path_factory):
    # The model path as `sglang serve`'s positional argument.
    return _serve(SGLANG_SERVE, [tiny_model, *DKV], tmp_path_factory.mktemp("serve") / "log", prompts)


@pytest.fixture(scope="module")
def dkv_launcher(tiny_model, prompts, tmp_path_factory):
    return _serve(DKV_LAUNCH, ["--model-path", tiny_model, *DKV], tmp_path_factory.mktemp("dkv") / "log", prompts)


@pytest.fixture(scope="module")
def sglang_serve_vanilla(tiny_model, prompts, tmp_path_factory):
    return _serve(SGLANG_SERVE, ["--model-path", tiny_model, *CPU_FLAGS],
                  tmp_path_factory.mktemp("vanilla") / "log", prompts)


@pytest.fixture(scope="module")
def launch_server_full(tiny_model, prompts, tmp_path_factory):
    return _serve(SGLANG_LAUNCH, ["--model-path", tiny_model, "--kv-policy", "full"],
                  tmp_path_factory.mktemp("full") / "log", prompts)


def test_sglang_serve_compresses_long_prompts(sglang_serve_dkv, prompts):
    stats = sglang_serve_dkv["stats"]
    assert stats["policy"] == "dynamickv" and stats["budget"] == BUDGET
    assert stats["requests_compressed"] == len(prompts)  # every prompt is longer than the budget
    for prompt, kept, recent in zip(prompts, sglang_serve_dkv["kept"], stats["recent"]):
        assert len(kept) == TINY_LAYERS and sum(kept) == BUDGET * TINY_LAYERS
        assert recent["prompt_tokens"] == len(prompt) and recent["kept_per_layer"] == kept
    assert stats["pool_rows_free"] + stats["pool_rows_cached"] == stats["pool_rows_total"]
    assert "--kv-policy dynamickv" in sglang_serve_dkv["launch_command"]


def test_sglang_serve_serves_what_the_dkv_launcher_serves(sglang_serve_dkv, dkv_launcher):
    assert sglang_serve_dkv["tokens"] == dkv_launcher["tokens"]
    assert sglang_serve_dkv["kept"] == dkv_launcher["kept"]


def test_without_our_flags_sglang_is_vanilla(sglang_serve_vanilla, launch_server_full):
    assert sglang_serve_vanilla["stats"] == 404  # nothing of ours added
    assert launch_server_full["stats"]["policy"] == "full"
    assert all(k is None for k in sglang_serve_vanilla["kept"] + launch_server_full["kept"])
    assert sglang_serve_vanilla["tokens"] == launch_server_full["tokens"]


def _run(cmd, env=CPU_ENV):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False, env=env)


@pytest.mark.parametrize(
    "launcher, args, config_file, flag",
    [
        (SGLANG_LAUNCH, ["--kv-policy", "dynamickv", "--kv-budget", "8"], None, "--kv-budget"),
        (SGLANG_SERVE, [], "kv-policy: h2o\n", "--kv-policy"),  # given in SGLang's --config file
    ],
)
def test_bad_flag_exits_2_naming_it_before_loading(launcher, args, config_file, flag, tmp_path):
    if config_file:
        (tmp_path / "config.yaml").write_text(config_file)
        args = [*args, "--config", str(tmp_path / "config.yaml")]
    out = _run([*launcher, "--model-path", "/nonexistent", *args])
    assert out.returncode == 2, out.stderr[-2000:]
    assert f"error: {flag}:" in out.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path is needed only without CUDA")
def test_without_cuda_says_what_the_cpu_path_needs():
    env = {k: v for k, v in CPU_ENV.items() if k != "SGLANG_USE_CPU_ENGINE"}
    out = _run([*SGLANG_SERVE, "--model-path", "/nonexistent", *DKV], env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "SGLANG_USE_CPU_ENGINE=1" in out.stderr


def test_help_lists_our_flags_in_their_own_group():
    out = _run([*SGLANG_LAUNCH, "--help"])
    assert out.returncode == 0
    group = out.stdout[out.stdout.index("dkv-sglang KV-cache compression:"):]
    for flag in (*FLAGS, "--page-size"):
        assert flag in group
