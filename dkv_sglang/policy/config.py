"""The KV policy settings: one frozen object, validated once, shared by every process."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

POLICIES = ("full", "dynamickv", "snapkv", "pyramidkv", "streamingllm")
POOLINGS = ("avg", "max")
# How DynamicKV turns each layer's winners of the global top-k into its budget (dynamickv.py):
# reference = the paper's code; the others are the hypotheses of issue 14, each one change.
ALLOCATIONS = ("reference", "proportional", "normalized", "floor", "sinks", "contrast")
SINKS = 4  # attention sinks: the first prompt tokens, which most heads attend to whatever they read
# How a layer's rows are shared by its KV heads (heads.py): the same count each, or one top-k over
# the heads (Ada-KV's), the heads competing on contrast (adaptive) or on shares of their mass, or
# each head the larger of those two counts (max). Each mode names the scales its top-ks run on.
HEAD_RULES = {"uniform": (), "adaptive": ("adaptive",), "shares": ("shares",), "max": ("adaptive", "shares")}
HEAD_BUDGETS = tuple(HEAD_RULES)


class PolicyConfigError(ValueError):
    """A bad policy setting; ``flag`` names the command-line flag it came from."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


@dataclass(frozen=True)
class PolicyConfig:
    """What the KV policy keeps.

    budget:          average KV rows kept per layer per request, window included (the
                     paper's "KV size"); prompts of at most ``budget`` tokens are kept whole.
    window:          ws, the last prompt tokens whose queries score the prefix; always kept.
    kernel, pooling: 1-D pooling over the prefix scores (odd kernel, padding kernel//2).
    rmax:            DynamicKV's r_max: each layer first holds min(rmax*base, n-ws) rows.
    update_interval: m, DynamicKV re-decides its per-layer budgets every m layers.
    fill_surplus:    hand budget that a layer cannot use (capped by its held rows or the
                     prompt) to layers with room. False gives the reference's unique rows.
    allocation:      DynamicKV's layer budgets from the global top-k's winners (default
                     ``contrast``: chosen by docs/decisions.md's rule on held-out prompts, README
                     "Allocations"): ``reference``
                     (the paper: c_l = winners_l // L', so at small budgets most layers round
                     to 0), ``proportional`` (c_l = winners_l), ``normalized`` (proportional,
                     each layer's scores first divided by the layer's total), ``floor``
                     (proportional, every layer keeps at least base // 5, Ada-KV's safeguard),
                     ``sinks`` (the reference, but the first SINKS prompt tokens win no count:
                     every layer keeps them, and the rest of the budget goes by the count),
                     ``contrast`` (``floor``, each head's scores first divided by its median
                     row: a layer wins budget for rows that stand out from its own typical
                     row, not for flat attention whose rows are interchangeable).
    head_budgets:    ``uniform``: every KV head of a layer keeps the layer's count; ``adaptive``:
                     the layer's heads share H x count rows by one top-k (Ada-KV), each head
                     keeping at least a fifth of the count (dynamickv, snapkv, pyramidkv), each
                     head's scores over its median row; ``shares``: the same top-k, each head's
                     scores as shares of its window mass outside the first SINKS rows; ``max``:
                     each head the larger of its adaptive and shares counts, renormalised.
    """

    policy: str = "full"
    budget: int = 128
    window: int = 8
    kernel: int = 7
    pooling: str = "avg"
    rmax: int = 10
    update_interval: int = 4
    fill_surplus: bool = True
    allocation: str = "contrast"
    head_budgets: str = "uniform"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise PolicyConfigError("--kv-policy", f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        for flag, value in (
            ("--kv-budget", self.budget),
            ("--kv-window", self.window),
            ("--kv-kernel", self.kernel),
            ("--kv-rmax", self.rmax),
            ("--kv-update-interval", self.update_interval),
        ):
            if not isinstance(value, int) or isinstance(value, bool):
                raise PolicyConfigError(flag, f"must be an integer, got {value!r}")
            if value < 1:
                raise PolicyConfigError(flag, f"must be >= 1, got {value}")
        if self.budget < self.window + 1:
            raise PolicyConfigError(
                "--kv-budget", f"must be at least --kv-window + 1 = {self.window + 1}, got {self.budget}"
            )
        if self.kernel % 2 == 0:
            raise PolicyConfigError("--kv-kernel", f"must be odd (padding is kernel//2), got {self.kernel}")
        if self.pooling not in POOLINGS:
            raise PolicyConfigError("--kv-pooling", f"unknown pooling {self.pooling!r}; choose from {', '.join(POOLINGS)}")
        if self.allocation not in ALLOCATIONS:
            raise PolicyConfigError(
                "--kv-allocation", f"unknown allocation {self.allocation!r}; choose from {', '.join(ALLOCATIONS)}"
            )
        if self.head_budgets not in HEAD_BUDGETS:
            raise PolicyConfigError(
                "--kv-head-budgets", f"unknown mode {self.head_budgets!r}; choose from {', '.join(HEAD_BUDGETS)}"
            )

    @property
    def base(self) -> int:
        """Rows per layer kept besides the window (the reference's ``base``)."""
        return self.budget - self.window

    @property
    def compresses(self) -> bool:
        return self.policy != "full"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PolicyConfig:
        return cls(**json.loads(text))
