import pytest

from dkv_sglang.policy import PolicyConfig, PolicyConfigError
from dkv_sglang.policy.request import for_request, from_labels, merged

SERVER = PolicyConfig(policy="dynamickv", budget=128, window=8)


def test_no_override_is_the_server_config():
    assert for_request(SERVER, None) is SERVER
    assert for_request(SERVER, {}) is SERVER
    assert for_request(SERVER, {"thinking_budget": 5}) is SERVER  # other keys are not ours


def test_override_changes_policy_and_budget_only():
    cfg = for_request(SERVER, {"kv_policy": "snapkv", "kv_budget": 32})
    assert (cfg.policy, cfg.budget, cfg.window, cfg.rmax) == ("snapkv", 32, 8, SERVER.rmax)
    assert for_request(SERVER, {"kv_policy": "full"}).compresses is False
    assert for_request(SERVER, {"kv_allocation": "floor"}).allocation == "floor"
    assert for_request(SERVER, {"kv_head_budgets": "adaptive"}).head_budgets == "adaptive"


@pytest.mark.parametrize(
    "params, key",
    [
        ({"kv_policy": "h2o"}, "custom_params.kv_policy"),
        ({"kv_budget": 0}, "custom_params.kv_budget"),
        ({"kv_budget": -5}, "custom_params.kv_budget"),
        ({"kv_budget": 8}, "custom_params.kv_budget"),  # window + 1 is the least
        ({"kv_budget": 12.5}, "custom_params.kv_budget"),
        ({"kv_budget": "64"}, "custom_params.kv_budget"),
        ({"kv_budget": True}, "custom_params.kv_budget"),
        ({"kv_window": 4}, "custom_params.kv_window"),
        ({"kv_allocation": "greedy"}, "custom_params.kv_allocation"),
        ({"kv_allocation": 1}, "custom_params.kv_allocation"),
        ({"kv_head_budgets": "per-head"}, "custom_params.kv_head_budgets"),
        ([1, 2], "custom_params"),
    ],
)
def test_bad_overrides_name_their_key(params, key):
    with pytest.raises(PolicyConfigError) as e:
        for_request(SERVER, params)
    assert e.value.flag == key


def test_a_full_server_cannot_compress_one_request():
    full = PolicyConfig()
    assert for_request(full, {"kv_policy": "full", "kv_budget": 64}).compresses is False
    with pytest.raises(PolicyConfigError, match="--kv-policy full"):
        for_request(full, {"kv_policy": "dynamickv"})


def test_labels_are_typed_and_others_left_out():
    labels = {"kv_policy": "snapkv", "kv_budget": "64", "team": "search"}
    assert from_labels(labels, "custom_labels") == {"kv_policy": "snapkv", "kv_budget": 64}
    assert from_labels(None, "metadata") == {} and from_labels({"user": "a"}, "metadata") == {}


@pytest.mark.parametrize(
    "labels, key",
    [
        ({"kv_budget": "6x"}, "metadata.kv_budget"),
        ({"kv_budget": "-5"}, "metadata.kv_budget"),
        ({"kv_budget": "8"}, "metadata.kv_budget"),  # typed, then checked by for_request
        ({"kv_policy": "h2o"}, "metadata.kv_policy"),
        ({"kv_windw": "4"}, "metadata.kv_windw"),
    ],
)
def test_bad_labels_name_their_field(labels, key):
    with pytest.raises(PolicyConfigError) as e:
        for_request(SERVER, from_labels(labels, "metadata"), "metadata")
    assert e.value.flag == key


def test_merged_adds_and_refuses_conflicts():
    assert merged(None, {"kv_budget": 64}, "metadata") == {"kv_budget": 64}
    assert merged({"kv_budget": 64, "x": 1}, {"kv_budget": 64}, "metadata") == {"kv_budget": 64, "x": 1}
    with pytest.raises(PolicyConfigError) as e:
        merged({"kv_budget": 32}, {"kv_budget": 64}, "custom_labels")
    assert e.value.flag == "custom_labels.kv_budget" and "conflicts" in str(e.value)
