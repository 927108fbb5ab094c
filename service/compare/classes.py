"""Which classes did a model break? Per-class recall changes between two models on shared samples.

For every class, the samples of that class both models saw (aligned by sample
id) give a paired 2x2 table of top-1 correctness; McNemar's exact test on its
discordant counts (samples only one model gets right) tests whether the two
recalls differ. With thousands of classes the p-values are corrected by the
Benjamini-Hochberg procedure at the comparison's level (1 - confidence level).

Discrete tests: a class with d discordant samples cannot reach a p-value below
2 * 0.5**d, so classes where that bound exceeds the level can never be
significant; they are left out of the procedure (Gilbert 2005, "A modified
false discovery rate multiple-comparisons procedure for discrete data"), which
makes it more powerful without giving up the false discovery rate.
``classes_tested`` says how many took part.

Correctness is the binary top-1 view (argmax == label), the one McNemar's table
needs, so each recall difference is exactly (only_model_right - only_other_right)
/ support; with tied scores it can differ from the engine's tie-aware recall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from evalstream.service.compare.mcnemar import mcnemar_exact
from evalstream.service.engine.records import Records

F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ClassChange:
    class_index: int
    support: int
    recall: float
    other_recall: float
    only_model_right: int
    only_other_right: int
    p_value: float
    q_value: float

    @property
    def worse(self) -> bool:
        return self.recall < self.other_recall


@dataclass
class ClassRegressionResult:
    model: str
    other: str
    baseline: bool
    classes_tested: int
    fdr_level: float
    changes: list[ClassChange] = field(default_factory=list)

    @property
    def worse(self) -> int:
        return sum(1 for c in self.changes if c.worse)

    @property
    def better(self) -> int:
        return len(self.changes) - self.worse


def benjamini_hochberg(p: F64) -> F64:
    """Adjusted p-values (q-values): q_(i) = min over j >= i of p_(j) * m / j, capped at 1."""
    m = len(p)
    if m == 0:
        return np.zeros(0)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (m / np.arange(1, m + 1))
    q = np.minimum.accumulate(scaled[::-1])[::-1]
    out = np.empty(m)
    out[order] = np.minimum(q, 1.0)
    return out


def min_discordant(level: float) -> int:
    """Fewest discordant samples whose smallest attainable two-sided p-value, 2 * 0.5**d, is <= level."""
    return max(1, math.ceil(math.log2(2.0 / level))) if level > 0 else 1 << 62


def class_changes(
    model: str,
    other: str,
    records: Records,
    other_records: Records,
    num_classes: int,
    level: float,
    baseline: bool = False,
) -> ClassRegressionResult:
    """Classes whose recall differs significantly (BH at ``level``), largest support first.

    ``records`` and ``other_records`` must be aligned (row i is the same sample)."""
    if len(records) != len(other_records):
        raise ValueError("per-class changes need aligned records (the same samples in the same order)")
    label = records.label.astype(np.intp)
    right, other_right = records.correct, other_records.correct
    support = np.bincount(label, minlength=num_classes)
    hits = np.bincount(label[right], minlength=num_classes)
    other_hits = np.bincount(label[other_right], minlength=num_classes)
    only = np.bincount(label[right & ~other_right], minlength=num_classes)
    only_other = np.bincount(label[other_right & ~right], minlength=num_classes)
    tested = np.flatnonzero(only + only_other >= min_discordant(level))
    p = np.array([mcnemar_exact(int(only[c]), int(only_other[c])) for c in tested], dtype=np.float64)
    q = benjamini_hochberg(p)
    result = ClassRegressionResult(model, other, baseline, len(tested), level)
    for c, pc, qc in zip(tested.tolist(), p.tolist(), q.tolist(), strict=True):
        if qc <= level:
            result.changes.append(
                ClassChange(
                    class_index=c,
                    support=int(support[c]),
                    recall=float(hits[c] / support[c]),
                    other_recall=float(other_hits[c] / support[c]),
                    only_model_right=int(only[c]),
                    only_other_right=int(only_other[c]),
                    p_value=pc,
                    q_value=qc,
                )
            )
    result.changes.sort(key=lambda ch: (-ch.support, ch.class_index))
    return result
