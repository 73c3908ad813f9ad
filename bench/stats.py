"""Confidence intervals and paired tests for the quality tables (pure Python, no numpy needed).

- ``wilson``: 95% Wilson score interval of an accuracy k/n (stays inside [0, 1], honest at 0 and n).
- ``bootstrap_mean``: percentile bootstrap interval of a mean over prompts (seeded: same input,
  same interval), for scores that are not 0/1 (edit similarity, token match rate).
- ``mcnemar``: exact two-sided McNemar p-value of two policies paired on the same prompts: only the
  discordant prompts count (b = first right, second wrong; c = the reverse), and under "no
  difference" b ~ Binomial(b + c, 1/2).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of the proportion ``k`` of ``n``; (0, 1) when n is 0."""
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(values, reps: int = 2000, level: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    values = list(values)
    if not values:
        raise ValueError("no values")
    rng = random.Random(seed)
    n = len(values)
    return percentile_interval([sum(rng.choices(values, k=n)) / n for _ in range(reps)], level)


def percentile_interval(draws, level: float = 0.95) -> tuple[float, float]:
    """The central ``level`` range of bootstrap draws (the percentile method)."""
    draws = sorted(draws)
    tail = (1 - level) / 2
    return draws[int(math.floor(tail * (len(draws) - 1)))], draws[int(math.ceil((1 - tail) * (len(draws) - 1)))]


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of ``k`` successes in ``n`` fair coin flips (doubled smaller tail)."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


@dataclass(frozen=True)
class Paired:
    """Two policies on the same prompts: who won the prompts they disagree on, and the p-value."""

    n: int  # prompts answered by both
    first_only: int  # right under the first policy, wrong under the second
    second_only: int
    p_value: float

    @property
    def verdict(self) -> str:
        if self.p_value >= 0.05:
            return "tie" if self.first_only == self.second_only else "not significant"
        return "first better" if self.first_only > self.second_only else "second better"


def mcnemar(first: dict, second: dict) -> Paired:
    """Exact McNemar test of two ``{prompt: correct}`` maps over the prompts both hold."""
    common = sorted(set(first) & set(second))
    b = sum(1 for k in common if first[k] and not second[k])
    c = sum(1 for k in common if second[k] and not first[k])
    return Paired(len(common), b, c, binom_two_sided(b, b + c))


def fmt_interval(lo: float, hi: float, percent: bool = True) -> str:
    return f"[{100 * lo:.0f}, {100 * hi:.0f}]" if percent else f"[{lo:.2f}, {hi:.2f}]"


def fmt_p(p: float) -> str:
    return f"{p:.2g}" if p < 0.1 else f"{p:.2f}"
