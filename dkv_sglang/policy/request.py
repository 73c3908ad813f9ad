"""One request's policy: the server's settings, overridden by the request's ``custom_params``.

A request may carry ``sampling_params.custom_params = {"kv_policy": ..., "kv_budget": ...,
"kv_allocation": ..., "kv_head_budgets": ...}`` (pure data, checked here without SGLang). Everything else (window, pooling, ...) stays the
server's. A server started with ``--kv-policy full`` has no compressing pool, so its requests
may only ask for ``full``.

The same keys may come as strings in a string map (``custom_labels`` of ``/generate``,
``metadata`` of the OpenAI routes: the fields SGLang's router forwards, where it drops
``custom_params``): ``from_labels`` reads them, ``merged`` adds them to ``custom_params``.
"""

from __future__ import annotations

from dataclasses import replace

from .config import ALLOCATIONS, HEAD_BUDGETS, POLICIES, PolicyConfig, PolicyConfigError

KEYS = ("kv_policy", "kv_budget", "kv_allocation", "kv_head_budgets")
# the keys that name one of a fixed set: key -> (PolicyConfig field, choices, what it is)
CHOICES = {
    "kv_policy": ("policy", POLICIES, "policy"),
    "kv_allocation": ("allocation", ALLOCATIONS, "allocation"),
    "kv_head_budgets": ("head_budgets", HEAD_BUDGETS, "mode"),
}


def for_request(server: PolicyConfig, custom_params, source: str = "custom_params") -> PolicyConfig:
    """The settings one request runs with; raises PolicyConfigError naming the bad key
    (``source.key``: where the request put it)."""
    if not custom_params:
        return server
    if not isinstance(custom_params, dict):
        raise PolicyConfigError(source, f"must be a JSON object, got {type(custom_params).__name__}")
    unknown = sorted(k for k in custom_params if isinstance(k, str) and k.startswith("kv_") and k not in KEYS)
    if unknown:
        raise PolicyConfigError(f"{source}.{unknown[0]}", f"unknown key; allowed: {', '.join(KEYS)}")
    changes = {}
    for key, (field, choices, what) in CHOICES.items():
        if key in custom_params:
            value = custom_params[key]
            if value not in choices:
                raise PolicyConfigError(f"{source}.{key}", f"unknown {what} {value!r}; choose from {', '.join(choices)}")
            changes[field] = value
    if changes.get("policy", "full") != "full" and not server.compresses:
        raise PolicyConfigError(
            f"{source}.kv_policy",
            f"this server was started with --kv-policy full; start it with a compressing policy to use "
            f"{changes['policy']!r}",
        )
    if "kv_budget" in custom_params:
        budget = custom_params["kv_budget"]
        if not isinstance(budget, int) or isinstance(budget, bool):
            raise PolicyConfigError(f"{source}.kv_budget", f"must be an integer, got {budget!r}")
        if budget < server.window + 1:
            raise PolicyConfigError(
                f"{source}.kv_budget", f"must be at least the window + 1 = {server.window + 1}, got {budget}"
            )
        changes["budget"] = budget
    return replace(server, **changes) if changes else server


def from_labels(labels, source: str) -> dict:
    """The ``kv_*`` entries of a string map, typed as ``custom_params`` values (``"64"`` -> 64).

    Other entries are not ours and are left out; a budget that is not a decimal integer raises
    PolicyConfigError naming ``source.kv_budget``.
    """
    if not isinstance(labels, dict):
        return {}
    ours = {k: v for k, v in labels.items() if isinstance(k, str) and k.startswith("kv_")}
    budget = ours.get("kv_budget")
    if isinstance(budget, str):
        if not budget.strip().isdecimal():
            raise PolicyConfigError(f"{source}.kv_budget", f"must be an integer, got {budget!r}")
        ours["kv_budget"] = int(budget)
    return ours


def merged(custom_params, extra: dict, source: str) -> dict:
    """``custom_params`` plus ``extra`` (read from ``source``); a key given both ways with two
    different values raises PolicyConfigError."""
    out = dict(custom_params) if isinstance(custom_params, dict) else {}
    for key, value in extra.items():
        if key in out and out[key] != value:
            raise PolicyConfigError(f"{source}.{key}", f"{value!r} conflicts with custom_params.{key} = {out[key]!r}")
        out[key] = value
    return out
