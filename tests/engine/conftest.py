"""Shared engines for the engine tests: one engine per policy per module, started once.

Engines run one at a time (2 cores): each fixture shuts its engine down before the next.
Outputs are compared in float32: in bfloat16 vanilla SGLang itself varies batched vs alone.
"""

from __future__ import annotations

import random

import pytest

from .models import TINY_LAYERS, tiny_llama

pytestmark = pytest.mark.engine

ENGINE_ARGS = {"dtype": "float32", "max_total_tokens": 16384, "log_level": "error", "random_seed": 0}
PROMPT_LENGTHS = (400, 230, 150, 60)
SAMPLING = {"max_new_tokens": 24, "temperature": 0}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    return str(tiny_llama(tmp_path_factory.mktemp("tiny") / "llama"))


@pytest.fixture(scope="session")
def prompts():
    rng = random.Random(0)
    return [[rng.randrange(100, 40000) for _ in range(n)] for n in PROMPT_LENGTHS]


def run_engine(model: str, prompts, vanilla: bool = False, **dkv_options):
    """Generate greedily for ``prompts`` batched, then one by one; return both and the stats."""
    import dkv_sglang
    from dkv_sglang import machine

    machine.prepare()
    if vanilla:
        from sglang.srt.entrypoints.engine import Engine

        engine = Engine(model_path=model, device="cpu", attention_backend="torch_native",
                        mem_fraction_static=0.3, **ENGINE_ARGS)
    else:
        engine = dkv_sglang.Engine(model_path=model, **dkv_options, **ENGINE_ARGS)
    try:
        batched = [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=SAMPLING)]
        stats_batched = engine.dkv_stats() if not vanilla else None
        alone = [engine.generate(input_ids=p, sampling_params=SAMPLING)["output_ids"] for p in prompts]
        stats = engine.dkv_stats() if not vanilla else None
        return {"batched": batched, "alone": alone, "stats_batched": stats_batched, "stats": stats}
    finally:
        engine.shutdown()


__all__ = ["ENGINE_ARGS", "SAMPLING", "TINY_LAYERS", "run_engine"]
