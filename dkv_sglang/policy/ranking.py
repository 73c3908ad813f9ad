"""Top-k with the policy's tie rule, on any device and without a host sync (pure torch).

Every ranking in the policies breaks ties the same way: among equal scores the earlier item
(prompt position, layer or head) comes first, as a stable descending sort would order them.
``torch.topk`` promises no order among ties, so each score becomes one int64 key: the float's
bits made order-preserving in the high 32 bits, ``2**31 - 1 - item`` in the low ones. Keys
compare as (score, earlier item) do, and a top-k of keys is the stable sort's prefix.

Scores must not be NaN; -0.0 ranks as 0.0.
"""

from __future__ import annotations

import struct

import torch

LOW = 2**31 - 1  # item i is stored as LOW - i: a larger key is an earlier item
EXCLUDED = torch.iinfo(torch.int64).min  # below every real key: an entry that takes no part


def ordered_bits(scores: torch.Tensor) -> torch.Tensor:
    """int32, as scores compare: a float32's magnitude bits, negated for a negative float
    (so -0.0 and 0.0 are both 0)."""
    bits = scores.float().contiguous().view(torch.int32)
    magnitude, sign = bits & LOW, bits >> 31  # sign: 0 or -1
    return magnitude.bitwise_xor_(sign).sub_(sign)


def rank_keys(scores: torch.Tensor, item: torch.Tensor | int) -> torch.Tensor:
    """int64 keys of ``scores``, ties broken by ``item`` (broadcast; 0 <= item < 2**31),
    the earlier item higher."""
    return ordered_bits(scores).to(torch.int64).bitwise_left_shift_(32).add_(LOW - item)


def item_of(keys: torch.Tensor) -> torch.Tensor:
    """The ``item`` each key was made with (garbage for ``EXCLUDED``)."""
    return LOW - (keys & 0xFFFFFFFF)


def score_bits(score: float) -> int:
    """``ordered_bits`` of one host float, computed on the host (to compare keys' high halves with)."""
    (bits,) = struct.unpack("<i", struct.pack("<f", score))
    return -(bits & LOW) if bits < 0 else bits


NEG_INF = score_bits(float("-inf"))


def top_rows(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` best of every row of ``scores`` ([..., p] float), best first, ties to the
    earlier position: (scores [..., k] float32, positions [..., k] int64), exactly the first
    ``k`` of ``scores.sort(dim=-1, descending=True, stable=True)``."""
    p = scores.shape[-1]
    keys = rank_keys(scores, torch.arange(p, device=scores.device))
    positions = item_of(keys.topk(k, dim=-1).values)
    return scores.float().gather(-1, positions), positions
