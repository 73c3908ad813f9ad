"""KV policies: pure torch, no SGLang import (tests prove it), usable on their own."""

from .config import POLICIES, PolicyConfig, PolicyConfigError
from .dynamickv import Selection, select
from .scoring import pool_scores, window_scores

__all__ = [
    "POLICIES",
    "PolicyConfig",
    "PolicyConfigError",
    "Selection",
    "pool_scores",
    "select",
    "window_scores",
]
