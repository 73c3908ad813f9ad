"""The ``openai`` package (what application code uses) against a dkv server: chat completions and
completions, streaming, ``n > 1``, per-request ``custom_params`` through ``extra_body`` (or
``metadata``), the kept rows in ``response.metadata``, and bad values as ``BadRequestError``."""

from __future__ import annotations

import openai
import pytest

from .cluster import Worker, idle
from .conftest import TINY_LAYERS

pytestmark = pytest.mark.engine

BUDGET, L = 32, TINY_LAYERS
LONG = "Tell me about the weather in the mountains. " * 20  # > BUDGET tokens: compressed


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    worker = Worker(["--model-path", tiny_model, "--kv-policy", "dynamickv", "--kv-budget", str(BUDGET),
                     "--dtype", "float32", "--max-total-tokens", "16384", "--log-level", "warning"],
                    tmp_path_factory.mktemp("openai") / "server.log")
    try:
        worker.wait_ready()
        yield worker
        assert idle(worker.stats()), worker.stats()
    finally:
        worker.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def _chat(client, **kw):
    args = {"model": "default", "messages": [{"role": "user", "content": LONG}], "max_tokens": 8,
            "temperature": 0}
    return client.chat.completions.create(**{**args, **kw})


def test_chat_completion_reports_its_kept_rows(client):
    r = _chat(client)
    assert r.choices[0].message.content and r.usage.prompt_tokens > BUDGET
    [kept] = r.metadata["kv_kept_per_layer"]  # DynamicKV: each layer its own budget, BUDGET x L in all
    assert len(kept) == L and sum(kept) == BUDGET * L
    short = _chat(client, messages=[{"role": "user", "content": "hi"}])
    assert "kv_kept_per_layer" not in short.metadata  # a prompt within the budget is kept whole


def test_completion_with_custom_params_in_extra_body(client):
    r = client.completions.create(model="default", prompt=LONG, max_tokens=8, temperature=0,
                                  extra_body={"custom_params": {"kv_policy": "snapkv", "kv_budget": 16}})
    assert r.choices[0].text is not None
    assert r.metadata["kv_kept_per_layer"] == [[16] * L]


def test_chat_with_custom_params_or_metadata(client):
    by_custom = _chat(client, extra_body={"custom_params": {"kv_policy": "streamingllm", "kv_budget": 24}})
    by_metadata = _chat(client, metadata={"kv_policy": "streamingllm", "kv_budget": "24"})
    assert by_custom.metadata["kv_kept_per_layer"] == by_metadata.metadata["kv_kept_per_layer"] == [[24] * L]
    assert by_custom.choices[0].message.content == by_metadata.choices[0].message.content


def test_streaming_gives_the_same_text(client):
    whole = _chat(client, max_tokens=16).choices[0].message.content
    chunks = list(_chat(client, max_tokens=16, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    text = client.completions.create(model="default", prompt=LONG, max_tokens=16, temperature=0).choices[0].text
    streamed = client.completions.create(model="default", prompt=LONG, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text


def test_n_choices_each_report_their_rows(client):
    r = _chat(client, n=3, temperature=1.0, extra_body={"custom_params": {"kv_budget": 20}})
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    kept = r.metadata["kv_kept_per_layer"]
    assert len(kept) == 3 and all(sum(k) == 20 * L for k in kept)
    c = client.completions.create(model="default", prompt=[LONG, "hi"], n=2, max_tokens=4)
    kept = c.metadata["kv_kept_per_layer"]
    assert len(c.choices) == len(kept) == 4
    assert sorted(k is None for k in kept) == [False, False, True, True]  # "hi" is kept whole


@pytest.mark.parametrize(
    "extra, reason",
    [
        ({"extra_body": {"custom_params": {"kv_budget": 4}}}, "custom_params.kv_budget"),
        ({"extra_body": {"custom_params": {"kv_policy": "h2o"}}}, "custom_params.kv_policy"),
        ({"metadata": {"kv_budget": "lots"}}, "metadata.kv_budget"),
        ({"metadata": {"kv_budget": "16"}, "extra_body": {"custom_params": {"kv_budget": 20}}}, "conflicts"),
    ],
)
def test_bad_values_are_a_bad_request_with_the_reason(client, extra, reason):
    with pytest.raises(openai.BadRequestError) as e:
        _chat(client, **extra)
    assert reason in str(e.value)
