"""What the quality benchmarks share: presets (`--quick` / `--standard` / the full sweep, as
argparse defaults) and the policy labels each request turns into ``custom_params``."""

from __future__ import annotations

from dkv_sglang.policy.config import ALLOCATIONS, HEAD_BUDGETS, PolicyConfig

POLICIES = ("dynamickv", "snapkv", "pyramidkv", "streamingllm")
# A label is a policy, optionally ":allocation" (DynamicKV's --kv-allocation; plain "dynamickv"
# is the server's default) and "+<mode>" (--kv-head-budgets <mode>): "dynamickv:floor+adaptive".
HEAD_MODES = tuple(h for h in HEAD_BUDGETS if h != "uniform")
VARIANTS = (*(f"dynamickv:{a}" for a in ALLOCATIONS),
            *(f"{p}+{h}" for h in HEAD_MODES for p in ("dynamickv", "snapkv", "pyramidkv")),
            *(f"dynamickv:{a}+{h}" for h in HEAD_MODES for a in ALLOCATIONS))
LABELS = POLICIES + VARIANTS
DEFAULT_ALLOCATION = PolicyConfig.allocation  # what a plain "dynamickv" label runs with


def default_label(labels, default: str = DEFAULT_ALLOCATION) -> str:
    """Which of ``labels`` runs the server's default DynamicKV: plain ``dynamickv``, else
    ``dynamickv:<default>`` (the issue's targets and layer shapes are about that one)."""
    return next((x for x in ("dynamickv", f"dynamickv:{default}") if x in labels), "dynamickv")


def spelled(label: str, default: str) -> str:
    """The label with DynamicKV's allocation written out (``dynamickv+adaptive`` ->
    ``dynamickv:<default>+adaptive``), so results of runs with different server defaults match."""
    name, plus, heads = label.partition("+")
    return (f"dynamickv:{default}" if name == "dynamickv" else name) + plus + heads


def custom_params(label: str, budget: int | None) -> dict:
    """A request's ``custom_params`` for a policy label and budget (None: no budget, full KV)."""
    name, _, heads = label.partition("+")
    policy, _, allocation = name.partition(":")
    out = {"kv_policy": policy}
    if allocation:
        out["kv_allocation"] = allocation
    if heads:
        out["kv_head_budgets"] = heads
    if budget is not None:
        out["kv_budget"] = budget
    return out


def apply_preset(args, presets: dict[str, dict]) -> str:
    """Fill every option the user left unset (None) from the chosen preset; return its name."""
    name = "quick" if args.quick else "standard" if args.standard else "full"
    for key, value in presets[name].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return name
