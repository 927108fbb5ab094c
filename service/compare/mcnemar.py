"""McNemar's exact test on top-1 correctness of two models on the same samples.

Only the discordant pairs carry information: b samples the first model gets
right and the second wrong, c the other way round. Under "equally accurate"
b ~ Binomial(b + c, 1/2); the two-sided exact p-value is
min(1, 2 * P(X <= min(b, c))), as scipy.stats.binomtest(min, b + c, 0.5) gives for p = 1/2.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def log_binomial_half_cdf(k: int, n: int) -> float:
    """log P(X <= k) for X ~ Binomial(n, 1/2), stable for n in the millions."""
    if k >= n:
        return 0.0
    j = np.arange(1, k + 1, dtype=np.float64)
    # log C(n, j) by the product (n - j + 1) / j, accumulated in log space.
    log_choose = np.concatenate([[0.0], np.cumsum(np.log(n - j + 1.0) - np.log(j))])
    top = log_choose.max()
    return float(top + np.log(np.exp(log_choose - top).sum()) - n * np.log(2.0))


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact p-value for b vs c discordant pairs (1.0 when there are none)."""
    n = b + c
    if n == 0:
        return 1.0
    return float(min(1.0, 2.0 * np.exp(log_binomial_half_cdf(min(b, c), n))))


def discordant(correct_a: npt.NDArray[np.bool_], correct_b: npt.NDArray[np.bool_]) -> tuple[int, int]:
    """(a right and b wrong, b right and a wrong) on aligned samples."""
    return int(np.count_nonzero(correct_a & ~correct_b)), int(np.count_nonzero(correct_b & ~correct_a))
