import subprocess
import sys

import pytest

from dkv_sglang.cli import config_from_options, engine_defaults, kv_flags_given, sglang_argv, split_argv


def test_split_takes_our_flags_and_leaves_sglang_s():
    cfg, rest, want_help = split_argv(["--model-path", "m", "--kv-policy", "dynamickv", "--kv-budget=64", "--port", "1"])
    assert cfg.policy == "dynamickv" and cfg.budget == 64 and not want_help
    assert rest == ["--model-path", "m", "--port", "1"]


def test_only_our_flags_make_sglang_s_commands_leave_vanilla():
    assert kv_flags_given(["--model-path", "m", "--kv-policy=full"])
    assert kv_flags_given(["--kv-budget", "64"])
    # SGLang's own --kv-* flags are not ours.
    assert not kv_flags_given(["--model-path", "m", "--kv-cache-dtype", "fp8_e5m2", "--kv-canary", "--help"])


def test_sglang_argv_adds_what_the_user_did_not_give():
    cfg = config_from_options(kv_policy="dynamickv")
    out = sglang_argv(cfg, ["--model-path", "m", "--device=cpu"], on_cpu=True)
    assert out[:3] == ["--model-path", "m", "--device=cpu"] and out.count("--device") == 0
    assert "--attention-backend" in out and "--disable-overlap-schedule" not in out, "overlap stays on"
    asked = sglang_argv(cfg, ["--model-path", "m", "--disable-overlap-schedule"], on_cpu=True)
    assert asked.count("--disable-overlap-schedule") == 1, "the user's own flag goes through"
    assert sglang_argv(config_from_options(), ["--model-path", "m"], on_cpu=False) == ["--model-path", "m"]


def test_engine_options_and_defaults():
    cfg = config_from_options(kv_policy="dynamickv", kv_budget=32, kv_pooling="max")
    assert (cfg.policy, cfg.budget, cfg.pooling) == ("dynamickv", 32, "max")
    d = engine_defaults(cfg, given={"attention_backend"}, on_cpu=True)
    assert d["device"] == "cpu" and "attention_backend" not in d
    assert "disable_overlap_schedule" not in d and "disable_radix_cache" not in d, "overlap and the cache stay on"
    assert "disable_overlap_schedule" not in engine_defaults(config_from_options(), set(), on_cpu=True)


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--kv-policy", "h2o"], "--kv-policy"),
        (["--kv-policy", "dynamickv", "--kv-budget", "8"], "--kv-budget"),
        (["--kv-budget", "lots"], "--kv-budget"),
        (["--kv-kernel", "4"], "--kv-kernel"),
        (["--kv-window", "x"], "--kv-window"),
        (["--kv-pooling", "sum"], "--kv-pooling"),
        (["--kv-allocation", "greedy"], "--kv-allocation"),
        (["--kv-head-budgets", "ada"], "--kv-head-budgets"),
    ],
)
def test_launcher_rejects_bad_values_before_loading(args, flag):
    out = subprocess.run(
        [sys.executable, "-m", "dkv_sglang.launch_server", "--model-path", "/nonexistent", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode != 0
    assert flag in out.stderr
    assert "sglang" not in out.stderr.lower().replace("dkv_sglang", "")  # nothing loaded


def test_help_explains_our_flags():
    out = subprocess.run([sys.executable, "-m", "dkv_sglang.launch_server", "--help"],
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0
    for flag in ("--kv-policy", "--kv-budget", "--kv-window", "--kv-rmax", "--model-path"):
        assert flag in out.stdout
