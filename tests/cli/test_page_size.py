"""--page-size with a compressing policy is the dkv pool's; SGLang gets 1."""

import pytest

from dkv_sglang.cli import config_from_options, engine_defaults, take_page_size
from dkv_sglang.policy import PolicyConfigError

DKV = config_from_options(kv_policy="dynamickv")
FULL = config_from_options()


def test_compressing_policy_takes_the_page_size_and_gives_sglang_1():
    assert take_page_size(DKV, ["--model-path", "m", "--page-size", "16", "--port", "1"]) == (
        16,
        ["--model-path", "m", "--port", "1", "--page-size", "1"],
    )
    assert take_page_size(DKV, ["--page-size=16"]) == (16, ["--page-size", "1"])
    assert take_page_size(DKV, ["--page-size", "1"]) == (1, [])
    assert take_page_size(DKV, ["--port", "1"]) == (1, ["--port", "1"])


def test_full_policy_leaves_the_page_size_to_sglang():
    assert take_page_size(FULL, ["--page-size", "16"]) == (1, ["--page-size", "16"])


@pytest.mark.parametrize("argv", [["--page-size", "0"], ["--page-size", "x"], ["--page-size"]])
def test_bad_page_size_names_the_flag(argv):
    with pytest.raises(PolicyConfigError, match="--page-size"):
        take_page_size(DKV, argv)


def test_paged_pool_turns_the_radix_cache_off():
    assert engine_defaults(DKV, set(), on_cpu=True, page_size=16)["disable_radix_cache"] is True
    assert "disable_radix_cache" not in engine_defaults(DKV, set(), on_cpu=True, page_size=1)
    assert "disable_radix_cache" not in engine_defaults(FULL, set(), on_cpu=True, page_size=16)
