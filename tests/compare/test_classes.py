"""Per-class recall changes: a purpose-built pair where known classes were broken."""

from __future__ import annotations

import numpy as np
import pytest

from evalstream.service.compare import CandidateInput, CompareOptions, compare, compare_models
from evalstream.service.compare.classes import benjamini_hochberg, min_discordant
from evalstream.service.compare.mcnemar import mcnemar_exact
from evalstream.v1 import compare_pb2
from tests.compare.synth import candidate, world

N, C = 6000, 40
IDS = np.arange(N)
BROKEN = (2, 5, 11)


def _pair() -> tuple[CandidateInput, CandidateInput, np.ndarray]:
    """ "new" is the true scores with BROKEN never predicted; "old" is a noisier model."""
    logits, labels = world(N, C, seed=4, sharpness=2.0)
    rng = np.random.default_rng(8)
    old = candidate("old", logits + 3.0 * rng.standard_normal(logits.shape), labels, IDS)
    broken = logits.copy()
    broken[:, list(BROKEN)] -= 8.0
    new = candidate("new", broken, labels, IDS)
    return new, old, labels


def test_broken_classes_are_the_significant_regressions() -> None:
    new, old, labels = _pair()
    result = compare([old, new], CompareOptions(replicates=100))
    assert result.recommendation is not None and result.recommendation.model == "new"
    [r] = result.class_regressions
    assert (r.model, r.other, r.baseline, r.fdr_level) == ("new", "old", False, pytest.approx(0.05))
    worse = [c for c in r.changes if c.worse]
    assert {c.class_index for c in worse} == set(BROKEN)
    support = np.bincount(labels, minlength=C)
    for c in worse:
        assert c.recall == 0.0 and c.support == support[c.class_index]
        assert c.other_recall == pytest.approx(c.only_other_right / c.support)
        assert c.p_value == mcnemar_exact(c.only_model_right, c.only_other_right) and c.q_value >= c.p_value
    # Largest support first, ties by class index.
    assert [(-c.support, c.class_index) for c in r.changes] == sorted(
        (-c.support, c.class_index) for c in r.changes
    )
    assert r.worse == len(worse) and r.better == len(r.changes) - len(worse)


def test_against_the_gates_baseline_too() -> None:
    new, old, _ = _pair()
    gate = compare_pb2.Gate()
    resp = compare_models([new], CompareOptions(replicates=50, gate=gate), baseline=old)
    [r] = resp.class_regressions
    assert r.baseline and r.model == "new" and r.other.startswith("old")
    assert {c.class_index for c in r.changes if c.recall < c.other_recall} == set(BROKEN)


def test_benjamini_hochberg_matches_the_step_up_rule() -> None:
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(size=80), rng.uniform(0, 0.002, size=20)])
    q = benjamini_hochberg(p)
    level = 0.05
    # Step-up: reject the k smallest, k the largest i with p_(i) <= i * level / m.
    ordered = np.sort(p)
    passing = np.flatnonzero(ordered <= np.arange(1, len(p) + 1) * level / len(p))
    k = int(passing[-1]) + 1 if len(passing) else 0
    assert set(np.flatnonzero(q <= level)) == set(np.argsort(p)[:k])
    assert np.all(q >= p) and np.all(q <= 1)


def test_classes_that_cannot_reach_the_level_are_not_tested() -> None:
    # 2 * 0.5**5 = 0.0625 > 0.05 and 2 * 0.5**6 = 0.03125 <= 0.05.
    assert min_discordant(0.05) == 6
    assert mcnemar_exact(5, 0) > 0.05 and mcnemar_exact(6, 0) <= 0.05
