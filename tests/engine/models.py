"""Models for engine tests: a tiny random Llama built here, and the real SmolLM2 from set-up."""

from __future__ import annotations

from pathlib import Path

from runtime.prepare_model import prepare
from runtime.tiny_model import build

TINY_LAYERS = 6


def smollm2() -> Path:
    return prepare("smollm2")


def tiny_llama(folder: Path) -> Path:
    """A random 6-layer Llama (4 query / 2 KV heads, head_dim 16) with SmolLM2's tokenizer."""
    return build(folder, layers=TINY_LAYERS)
