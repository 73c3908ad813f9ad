"""dkv-sglang: DynamicKV KV-cache compression inside SGLang.

``dkv_sglang.Engine`` mirrors ``sglang.Engine``; ``python -m dkv_sglang.launch_server``
mirrors ``python -m sglang.launch_server``. Importing this package does not import SGLang;
the Engine does, after preparing the CPU path on machines without CUDA.
"""

__all__ = ["Engine"]


def __getattr__(name):
    if name == "Engine":
        from .engine import Engine

        return Engine
    raise AttributeError(name)
