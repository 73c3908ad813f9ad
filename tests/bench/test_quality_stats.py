"""bench.stats against known values: Wilson intervals, exact McNemar, bootstrap of a mean."""

from __future__ import annotations

import pytest

from bench import stats


@pytest.mark.parametrize("k,n,lo,hi", [
    (8, 10, 0.4902, 0.9433),  # textbook Wilson 95% values
    (0, 10, 0.0, 0.2775),
    (10, 10, 0.7225, 1.0),
    (50, 100, 0.4038, 0.5962),
])
def test_wilson_known_values(k, n, lo, hi):
    got = stats.wilson(k, n)
    assert got == pytest.approx((lo, hi), abs=5e-4)


def test_wilson_narrows_with_n_and_rejects_bad_counts():
    w10 = stats.wilson(5, 10)
    w100 = stats.wilson(50, 100)
    assert w100[1] - w100[0] < w10[1] - w10[0]
    assert stats.wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        stats.wilson(11, 10)


@pytest.mark.parametrize("k,n,p", [
    (0, 6, 2 / 64),  # 6 discordant prompts all one way
    (1, 10, 2 * 11 / 1024),
    (9, 10, 2 * 11 / 1024),  # symmetric
    (5, 10, 1.0),
    (0, 0, 1.0),
])
def test_exact_binomial_two_sided(k, n, p):
    assert stats.binom_two_sided(k, n) == pytest.approx(p)


def test_binomial_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for n in (1, 7, 20, 41):
        for k in range(n + 1):
            want = scipy_stats.binomtest(k, n, 0.5).pvalue
            assert stats.binom_two_sided(k, n) == pytest.approx(want, rel=1e-9)


def test_mcnemar_counts_discordant_pairs_only():
    a = {f"p{i}": True for i in range(20)}
    b = dict(a)
    for i in range(6):
        b[f"p{i}"] = False  # a right, b wrong on 6 prompts
    b["extra"] = True  # unpaired: ignored
    res = stats.mcnemar(a, b)
    assert (res.n, res.first_only, res.second_only) == (20, 6, 0)
    assert res.p_value == pytest.approx(2 / 64) and res.verdict == "first better"
    assert stats.mcnemar(b, a).verdict == "second better"
    same = stats.mcnemar(a, a)
    assert same.p_value == 1.0 and same.verdict == "tie"
    assert stats.mcnemar({"x": True, "y": False}, {"x": False, "y": True}).verdict == "tie"


def test_bootstrap_mean_brackets_the_mean_and_is_seeded():
    values = [0.0] * 30 + [1.0] * 70
    lo, hi = stats.bootstrap_mean(values)
    assert lo < 0.7 < hi
    assert 0.55 < lo and hi < 0.85  # about the Wilson width for n=100
    assert stats.bootstrap_mean(values) == (lo, hi)
    assert stats.bootstrap_mean([0.4] * 10) == (pytest.approx(0.4), pytest.approx(0.4))
    wide = stats.bootstrap_mean(values[::10])
    assert wide[1] - wide[0] > hi - lo
    with pytest.raises(ValueError):
        stats.bootstrap_mean([])
