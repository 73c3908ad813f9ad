"""Physical pages of 16 head-rows under DynamicKV: the same greedy tokens and kept rows as
page size 1 (tiny random Llama, batched and alone, chunked prefill), and the pool idle after."""

from __future__ import annotations

import pytest

from .conftest import PROMPT_LENGTHS, TINY_LAYERS, run_engine

pytestmark = pytest.mark.engine

SMALL = 32
# the same SGLang settings for both: prompts prefilled in chunks, no prefix cache (page size 16
# turns it off; page size 1 runs without it too, so the runs differ in the page size alone)
OPTIONS = {"kv_policy": "dynamickv", "kv_budget": SMALL, "chunked_prefill_size": 128, "disable_radix_cache": True}


@pytest.fixture(scope="module")
def rows_1(tiny_model, prompts):
    return run_engine(tiny_model, prompts, **OPTIONS)


@pytest.fixture(scope="module")
def pages_16(tiny_model, prompts):
    return run_engine(tiny_model, prompts, page_size=16, **OPTIONS)


def _kept(stats):
    return [(r["prompt_tokens"], r["kept_per_layer"], r["rows_freed"]) for r in stats["recent"]]


def test_page_size_16_gives_the_same_tokens_and_kept_rows_as_page_size_1(rows_1, pages_16):
    assert rows_1["stats"]["page_size"] == 1 and pages_16["stats"]["page_size"] == 16
    assert pages_16["batched"] == rows_1["batched"]
    assert pages_16["alone"] == rows_1["alone"]
    assert _kept(pages_16["stats"]) == _kept(rows_1["stats"])
    long_prompts = [n for n in PROMPT_LENGTHS if n > SMALL]
    assert pages_16["stats"]["requests_compressed"] == 2 * len(long_prompts)
    assert all(sum(r["kept_per_layer"]) == SMALL * TINY_LAYERS for r in pages_16["stats"]["recent"])


def test_paged_pool_is_idle_after(pages_16):
    for stats in (pages_16["stats_batched"], pages_16["stats"]):
        assert stats["pool_rows_free"] == stats["pool_rows_total"]
        assert stats["kept_index_entries"] == 0
