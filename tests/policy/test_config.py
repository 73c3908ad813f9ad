import pytest

from dkv_sglang.policy import PolicyConfig, PolicyConfigError


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"policy": "h2o"}, "--kv-policy"),
        ({"budget": 8}, "--kv-budget"),  # < window + 1
        ({"budget": 0}, "--kv-budget"),
        ({"kernel": 6}, "--kv-kernel"),
        ({"pooling": "median"}, "--kv-pooling"),
        ({"rmax": 0}, "--kv-rmax"),
        ({"update_interval": "4"}, "--kv-update-interval"),
        ({"allocation": "greedy"}, "--kv-allocation"),
        ({"head_budgets": "ada"}, "--kv-head-budgets"),
    ],
)
def test_bad_values_name_their_flag(kwargs, flag):
    with pytest.raises(PolicyConfigError) as e:
        PolicyConfig(**kwargs)
    assert e.value.flag == flag
    assert str(e.value).startswith(flag)


def test_round_trip_and_derived_values():
    cfg = PolicyConfig(policy="dynamickv", budget=64, window=8)
    assert PolicyConfig.from_json(cfg.to_json()) == cfg
    assert cfg.base == 56 and cfg.compresses
    assert not PolicyConfig().compresses
