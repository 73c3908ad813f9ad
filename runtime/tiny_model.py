"""Random-weight Llama checkpoints for mechanics tests and throughput benchmarks.

Built locally (no hub), with SmolLM2's tokenizer from ``runtime.prepare_model``. The weights are
random, so outputs mean nothing, but every SGLang code path (batching, memory, attention) runs
as for a trained model, and fast.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from runtime.prepare_model import prepare


def build(
    folder: Path,
    *,
    layers: int = 6,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    intermediate: int = 128,
    context: int = 4096,
    seed: int = 0,
) -> Path:
    """Save a random Llama under ``folder`` once (idempotent); return the folder."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    tok_src = prepare("smollm2")
    tok = AutoTokenizer.from_pretrained(tok_src)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=context,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
        # Wide init: greedy outputs vary token to token, so equality tests can fail.
        initializer_range=0.1,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if (tok_src / "chat_template.jinja").exists():
        shutil.copy(tok_src / "chat_template.jinja", folder / "chat_template.jinja")
    return folder
