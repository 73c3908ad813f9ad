"""``dkv_sglang.Engine``: ``sglang.Engine`` with the --kv-* options as keyword arguments."""

from __future__ import annotations

import os

from . import machine
from .cli import FLAGS, check_page_size, config_from_options, engine_defaults
from .integration import settings

_OUR_KEYS = {flag[2:].replace("-", "_") for flag in FLAGS}

on_cpu = machine.prepare()

from sglang.srt.entrypoints.engine import Engine as _SGLangEngine


class Engine(_SGLangEngine):
    """Same options as ``sglang.Engine`` plus ``kv_policy``, ``kv_budget``, ``kv_window``,
    ``kv_kernel``, ``kv_pooling``, ``kv_rmax``, ``kv_update_interval``, ``kv_allocation``,
    ``kv_head_budgets``; with a compressing policy ``page_size`` is the dkv pool's physical page
    size (SGLang's stays 1)."""

    def __init__(self, **kwargs):
        ours = {k: kwargs.pop(k) for k in list(kwargs) if k in _OUR_KEYS}
        self.dkv_config = config_from_options(**ours)
        # With a compressing policy page_size is the dkv pool's (rows per physical page); SGLang gets 1.
        self.dkv_page_size = 1
        if self.dkv_config.compresses and kwargs.get("page_size") not in (None, 1):
            self.dkv_page_size = check_page_size(kwargs.pop("page_size"))
            kwargs["page_size"] = 1
        # Published for the processes this engine spawns; put back at shutdown, so an engine made
        # later in this process (a plain sglang.Engine included) does not inherit them.
        self._dkv_env = {var: os.environ.get(var) for var in (settings.ENV_VAR, settings.PAGE_SIZE_VAR)}
        settings.publish(self.dkv_config)
        settings.publish_page_size(self.dkv_page_size)
        kwargs = {**engine_defaults(self.dkv_config, set(kwargs), on_cpu, self.dkv_page_size), **kwargs}
        super().__init__(**kwargs)

    def shutdown(self):
        try:
            super().shutdown()
        finally:
            for var, value in getattr(self, "_dkv_env", {}).items():
                if value is None:
                    os.environ.pop(var, None)
                else:
                    os.environ[var] = value

    def dkv_stats(self) -> dict:
        """The scheduler's dkv stats: policy, budget, pool rows, recent compressed requests
        (with ``dp_size`` > 1 the ranks summed, as ``GET /dkv/stats`` does)."""
        from .stats import combine

        return combine([state["dkv"] for state in self.get_server_info()["internal_states"]])
