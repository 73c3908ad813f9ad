"""One request's policy: the server's settings, overridden by the request's ``custom_params``.

A request may carry ``sampling_params.custom_params = {"kv_policy": ..., "kv_budget": ...}``
(pure data, checked here without SGLang). Everything else (window, pooling, ...) stays the
server's. A server started with ``--kv-policy full`` has no compressing pool, so its requests
may only ask for ``full``.
"""

from __future__ import annotations

from dataclasses import replace

from .config import POLICIES, PolicyConfig, PolicyConfigError

KEYS = ("kv_policy", "kv_budget")


def for_request(server: PolicyConfig, custom_params) -> PolicyConfig:
    """The settings one request runs with; raises PolicyConfigError naming the bad key."""
    if not custom_params:
        return server
    if not isinstance(custom_params, dict):
        raise PolicyConfigError("custom_params", f"must be a JSON object, got {type(custom_params).__name__}")
    unknown = sorted(k for k in custom_params if isinstance(k, str) and k.startswith("kv_") and k not in KEYS)
    if unknown:
        raise PolicyConfigError(f"custom_params.{unknown[0]}", f"unknown key; allowed: {', '.join(KEYS)}")
    changes = {}
    if "kv_policy" in custom_params:
        policy = custom_params["kv_policy"]
        if policy not in POLICIES:
            raise PolicyConfigError("custom_params.kv_policy", f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
        if policy != "full" and not server.compresses:
            raise PolicyConfigError(
                "custom_params.kv_policy",
                f"this server was started with --kv-policy full; start it with a compressing policy to use {policy!r}",
            )
        changes["policy"] = policy
    if "kv_budget" in custom_params:
        budget = custom_params["kv_budget"]
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise PolicyConfigError("custom_params.kv_budget", f"must be an integer, got {budget!r}")
        if budget < server.window + 1:
            raise PolicyConfigError(
                "custom_params.kv_budget", f"must be at least the window + 1 = {server.window + 1}, got {budget}"
            )
        changes["budget"] = budget
    return replace(server, **changes) if changes else server
