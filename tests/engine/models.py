"""Models for engine tests: a tiny random Llama built here, and the real SmolLM2 from set-up."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from runtime.prepare_model import prepare

TINY_LAYERS = 6


def smollm2() -> Path:
    return prepare("smollm2")


def tiny_llama(folder: Path) -> Path:
    """A random 6-layer Llama (4 query / 2 KV heads, head_dim 16) with SmolLM2's tokenizer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (folder / "config.json").exists():
        return folder
    tok_src = smollm2()
    tok = AutoTokenizer.from_pretrained(tok_src)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=TINY_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        # Wide init: greedy outputs vary token to token, so equality tests can fail.
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    for extra in ("chat_template.jinja",):
        if (tok_src / extra).exists():
            shutil.copy(tok_src / extra, folder / extra)
    return folder
