"""McNemar's exact test against scipy's binomtest; Kendall's tau-b against scipy's kendalltau."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evalstream.service.compare.agreement import kendall_tau_b
from evalstream.service.compare.mcnemar import discordant, mcnemar_exact

stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize(("b", "c"), [(0, 1), (3, 3), (5, 0), (10, 2), (40, 60), (480, 520), (3000, 3300)])
def test_mcnemar_matches_binomtest(b: int, c: int) -> None:
    expected = stats.binomtest(min(b, c), b + c, 0.5).pvalue
    assert mcnemar_exact(b, c) == pytest.approx(expected, rel=1e-9, abs=1e-300)


def test_mcnemar_without_discordant_pairs_is_one() -> None:
    assert mcnemar_exact(0, 0) == 1.0


def test_mcnemar_tiny_p_value_in_log_space() -> None:
    p = mcnemar_exact(200_000, 210_000)
    assert 0.0 < p < 1e-20
    assert math.log(p) == pytest.approx(math.log(stats.binomtest(200_000, 410_000, 0.5).pvalue), rel=1e-6)


def test_discordant_counts() -> None:
    a = np.array([True, True, False, False, True])
    b = np.array([True, False, True, False, False])
    assert discordant(a, b) == (2, 1)


@pytest.mark.parametrize("seed", range(6))
def test_kendall_tau_b_matches_scipy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    m = int(rng.integers(3, 9))
    x = rng.integers(0, 4, m).astype(float)  # ties on purpose
    y = rng.integers(0, 4, m).astype(float)
    expected = stats.kendalltau(x, y).statistic
    got = kendall_tau_b(list(x), list(y))
    if math.isnan(expected):
        assert got is None
    else:
        assert got == pytest.approx(expected, abs=1e-12)


def test_kendall_tau_extremes() -> None:
    assert kendall_tau_b([1, 2, 3], [10, 20, 30]) == 1.0
    assert kendall_tau_b([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau_b([1, 1, 1], [1, 2, 3]) is None
