"""Kendall's tau-b between the candidate rankings two metrics give.

Each metric is first oriented by its direction (values negated where lower is
better), so tau = +1 means the two metrics order the candidates identically and
-1 means exactly reversed. Tau-b corrects for ties, as scipy.stats.kendalltau's
default does; a metric that ties every candidate has no ranking and gives no tau.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Tau-b of two equally long sequences; None when either has no two distinct values."""
    if len(x) != len(y):
        raise ValueError("kendall_tau_b needs sequences of equal length")
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denom = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    if denom == 0.0:
        return None
    return (concordant - discordant) / denom
