"""``dkv_sglang.Engine``: ``sglang.Engine`` with the --kv-* options as keyword arguments."""

from __future__ import annotations

from . import machine
from .cli import FLAGS, config_from_options, engine_defaults
from .integration import settings

_OUR_KEYS = {flag[2:].replace("-", "_") for flag in FLAGS}

on_cpu = machine.prepare()

from sglang.srt.entrypoints.engine import Engine as _SGLangEngine


class Engine(_SGLangEngine):
    """Same options as ``sglang.Engine`` plus ``kv_policy``, ``kv_budget``, ``kv_window``,
    ``kv_kernel``, ``kv_pooling``, ``kv_rmax``, ``kv_update_interval``."""

    def __init__(self, **kwargs):
        ours = {k: kwargs.pop(k) for k in list(kwargs) if k in _OUR_KEYS}
        self.dkv_config = config_from_options(**ours)
        settings.publish(self.dkv_config)
        kwargs = {**engine_defaults(self.dkv_config, set(kwargs), on_cpu), **kwargs}
        super().__init__(**kwargs)

    def dkv_stats(self) -> dict:
        """The scheduler's dkv stats: policy, budget, pool rows, recent compressed requests."""
        return self.get_server_info()["internal_states"][0]["dkv"]
