"""KV policies: pure torch, no SGLang import (tests prove it), usable on their own."""

from .config import POLICIES, PolicyConfig, PolicyConfigError
from .dynamickv import Selection
from .dynamickv import select as select_dynamickv
from .reduce import LOCAL
from .scoring import pool_scores, window_scores


def select(layer_scores, prompt_len: int, config: PolicyConfig, reducer=LOCAL) -> Selection | None:
    """The rows ``config.policy`` keeps for one request (None: keep everything).

    ``reducer`` is the tensor-parallel group when ``layer_scores`` hold one rank's heads: every
    rank must call this for the same requests (DynamicKV's layer budgets, adaptive head budgets
    and the reported kept rows span all ranks' heads).
    """
    from . import baselines

    chooser = {
        "dynamickv": select_dynamickv,
        "snapkv": baselines.select_snapkv,
        "pyramidkv": baselines.select_pyramidkv,
        "streamingllm": baselines.select_streamingllm,
    }[config.policy]
    return chooser(layer_scores, prompt_len, config, reducer)


__all__ = [
    "POLICIES",
    "PolicyConfig",
    "PolicyConfigError",
    "Selection",
    "pool_scores",
    "select",
    "window_scores",
]
