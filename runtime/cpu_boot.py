"""Imported at interpreter start by the ``dkv_sglang_cpu.pth`` file that set-up writes.

Acts only where ``SGLANG_USE_CPU_ENGINE=1`` is set (our launcher and Engine set it on
machines without CUDA before any worker is spawned): then SGLang's CPU path gets the
``sgl_kernel`` stand-ins in every process, spawned workers included. Elsewhere it does
nothing, so the venv's other programs are untouched.
"""

import os

if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
    from runtime import cpu_kernels

    cpu_kernels.install()
