"""SGLang's serving features with a compressing policy, against the real HTTP server: chunked
prefill, streaming, n > 1, stop strings, logprobs, constrained output, aborts, and a table of
bad inputs, each answered clearly with the pool back at idle afterwards."""

from __future__ import annotations

import json

import pytest
import requests

from bench.server import Server

from .conftest import SAMPLING, TINY_LAYERS

pytestmark = pytest.mark.engine

BUDGET = 32
CHUNK = 64  # well below the prompts: every prompt is prefilled in several chunks


def _args(tiny_model, *extra):
    return ["--model-path", tiny_model, "--kv-policy", "dynamickv", "--kv-budget", str(BUDGET),
            "--dtype", "float32", "--max-total-tokens", "16384", "--random-seed", "0", *extra]


# No in-process Engine in this module: shutting one down kills every child of the test process,
# servers included. References come from a second server.
@pytest.fixture(scope="module")
def chunk_prompts(prompts):
    """The shared prompts, plus three whose last chunk would be shorter than the window (8):
    5 x 64 + 3, 3 x 64 + 7 and 64 + 5 tokens (reversed: they share no prefix with the others)."""
    return [*prompts, prompts[0][::-1][: CHUNK * 5 + 3], prompts[1][::-1][: CHUNK * 3 + 7],
            prompts[2][::-1][: CHUNK + 5]]


@pytest.fixture(scope="module")
def unchunked(tiny_model, chunk_prompts, tmp_path_factory):
    with Server(_args(tiny_model), tmp_path_factory.mktemp("unchunked") / "server.log") as url:
        return [_generate(url, {"input_ids": p, "sampling_params": SAMPLING}).json() for p in chunk_prompts]


@pytest.fixture(scope="module")
def server(tiny_model, unchunked, tmp_path_factory):
    # (a random model fills free JSON whitespace until max_new_tokens: keep JSON compact)
    args = _args(tiny_model, "--chunked-prefill-size", str(CHUNK), "--enable-metrics",
                 "--constrained-json-disable-any-whitespace")
    with Server(args, tmp_path_factory.mktemp("features") / "server.log") as url:
        yield url


def _stats(url):
    return requests.get(url + "/dkv/stats", timeout=30).json()


def _generate(url, body, timeout=300):
    return requests.post(url + "/generate", json=body, timeout=timeout)


def _idle(url):
    s = _stats(url)
    return s["pool_rows_free"] + s["pool_rows_cached"] == s["pool_rows_total"] and s["kept_index_entries"] == 0


def test_chunked_prefill_keeps_the_same_rows_and_tokens(server, unchunked, chunk_prompts):
    for p, ref in zip(chunk_prompts, unchunked, strict=True):
        r = _generate(server, {"input_ids": p, "sampling_params": SAMPLING})
        assert r.status_code == 200
        out = r.json()
        assert out["output_ids"] == ref["output_ids"]
        assert out["meta_info"].get("kv_kept_per_layer") == ref["meta_info"].get("kv_kept_per_layer")
        assert ("kv_kept_per_layer" in out["meta_info"]) == (len(p) > BUDGET)
    assert _idle(server)


def test_streaming_returns_the_same_tokens_and_what_was_kept(server, prompts):
    body = {"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 16, "temperature": 0}}
    whole = _generate(server, body).json()
    chunks = []
    with requests.post(server + "/generate", json={**body, "stream": True}, stream=True, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith(b"data:") and line != b"data: [DONE]":
                chunks.append(json.loads(line[5:]))
    assert len(chunks) > 1 and chunks[-1]["output_ids"] == whole["output_ids"]
    last = chunks[-1]["meta_info"]
    assert last["finish_reason"] is not None
    for key in ("kv_kept_per_layer", "kv_prompt_tokens"):
        assert last[key] == whole["meta_info"][key], key
    assert last["kv_prompt_tokens"] == len(prompts[0])


def test_parallel_samples_stop_strings_logprobs_and_regex(server, prompts):
    r = _generate(server, {"input_ids": prompts[1], "sampling_params": {"max_new_tokens": 8, "temperature": 1.0, "n": 3}})
    assert r.status_code == 200 and len(r.json()) == 3
    r = _generate(server, {"input_ids": prompts[1], "return_logprob": True,
                           "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    meta = r.json()["meta_info"]
    assert len(meta["output_token_logprobs"]) == 8 and meta["kv_prompt_tokens"] == len(prompts[1])
    text = "word " * 200
    r = _generate(server, {"text": text, "sampling_params": {"max_new_tokens": 12, "temperature": 0, "regex": "(yes|no) [0-9]{3}"}})
    assert r.status_code == 200
    import re

    assert re.fullmatch(r"(yes|no) [0-9]{3}", r.json()["text"])
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}}, "required": ["answer"],
              "additionalProperties": False}
    r = _generate(server, {"text": text, "sampling_params": {"max_new_tokens": 64, "temperature": 0,
                                                             "json_schema": json.dumps(schema)}})
    assert r.status_code == 200 and json.loads(r.json()["text"])["answer"] in ("yes", "no")
    assert r.json()["meta_info"]["kv_prompt_tokens"] > BUDGET, "the constrained request was compressed"
    full = _generate(server, {"text": text, "sampling_params": {"max_new_tokens": 12, "temperature": 0}}).json()["text"]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    if stop.strip():
        r = _generate(server, {"text": text, "sampling_params": {"max_new_tokens": 12, "temperature": 0, "stop": stop}})
        assert stop not in r.json()["text"] and len(r.json()["text"]) < len(full)
    assert _idle(server)


def test_a_client_that_disconnects_mid_stream_frees_its_rows(server, prompts):
    body = {"input_ids": prompts[0], "stream": True,
            "sampling_params": {"max_new_tokens": 2000, "temperature": 0, "ignore_eos": True}}
    with requests.post(server + "/generate", json=body, stream=True, timeout=300) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 10:
                break  # leave mid-stream
    import time

    deadline = time.time() + 60
    while not _idle(server):
        assert time.time() < deadline, "rows of the abandoned request were not freed"
        time.sleep(0.2)
    assert requests.post(server + "/flush_cache", timeout=30).status_code == 200


LONG = "lorem " * 200


@pytest.mark.parametrize(
    "case, body, status, reason",
    [
        ("empty text", {"text": ""}, 400, "empty"),
        ("empty input_ids", {"input_ids": []}, 400, "empty"),
        ("shorter than the window", {"text": "hi"}, 200, ""),
        ("longer than the context", {"input_ids": [100] * 5000}, 400, "context"),
        ("budget 0", {"text": LONG, "custom": {"kv_budget": 0}}, 400, "kv_budget"),
        ("negative budget", {"text": LONG, "custom": {"kv_budget": -4}}, 400, "kv_budget"),
        ("non-integer budget", {"text": LONG, "custom": {"kv_budget": 40.5}}, 400, "kv_budget"),
        ("huge budget: kept whole", {"text": LONG, "custom": {"kv_budget": 10**12}}, 200, ""),
        ("unknown policy", {"text": LONG, "custom": {"kv_policy": "h2o"}}, 400, "kv_policy"),
        ("custom_params not an object", {"text": LONG, "custom": [1, 2]}, 400, ""),
        ("max_new_tokens 0", {"text": LONG, "max_new": 0}, 200, ""),
    ],
)
def test_bad_input(server, case, body, status, reason):
    params = {"max_new_tokens": body.pop("max_new", 4), "temperature": 0}
    if "custom" in body:
        params["custom_params"] = body.pop("custom")
    r = _generate(server, {**body, "sampling_params": params}, timeout=120)
    assert r.status_code == status, (case, r.text[:300])
    assert reason in r.text, (case, r.text[:300])
    assert _idle(server), case


def test_pool_is_idle_after_everything(server):
    s = _stats(server)
    assert s["pool_rows_free"] + s["pool_rows_cached"] == s["pool_rows_total"] and s["num_layers"] == TINY_LAYERS


def test_frontend_program_runs_unchanged(server):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
    from frontend_program import run

    before = _stats(server)["requests_compressed"]
    doc = " ".join(f"Fact {i}: the keeper counted {i * 7} ships." for i in range(60))
    out = run(server, doc, "How many ships in fact 40?")
    assert isinstance(out["answer"], str) and len(out["followups"]) == 2
    assert out["certain"] in ("yes", "no")
    assert _stats(server)["requests_compressed"] > before, "the long program turns were compressed"
    assert _idle(server)


def test_prometheus_series(server):
    text = requests.get(server + "/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        if line.startswith("dkv:"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    stats = _stats(server)
    assert values["dkv:requests_compressed_total"] == stats["requests_compressed"] > 0
    assert 0 < values["dkv:kept_rows_total"] < values["dkv:prompt_rows_total"]
    assert values["dkv:pool_rows_free"] <= stats["pool_rows_total"]
    per_layer = [values[f'dkv:kept_rows_by_layer_total{{layer="{i}"}}'] for i in range(TINY_LAYERS)]
    assert sum(per_layer) == values["dkv:kept_rows_total"]
