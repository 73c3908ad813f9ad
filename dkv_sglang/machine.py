"""Prepare this process (and the workers it spawns) for SGLang on a machine without CUDA.

Must run before SGLang is imported: SGLang reads ``SGLANG_USE_CPU_ENGINE`` at import time.
"""

from __future__ import annotations

import os


def has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001  (a broken CUDA install means: no GPU here)
        return False


def prepare() -> bool:
    """Switch SGLang to its CPU path when there is no GPU; True when on CPU."""
    if os.environ.get("SGLANG_USE_CPU_ENGINE") != "1" and has_cuda():
        return False
    os.environ["SGLANG_USE_CPU_ENGINE"] = "1"
    from runtime import cpu_kernels

    cpu_kernels.install()
    return True
