"""The bootstrap against a plain numpy reference with the same seed."""

from __future__ import annotations

import numpy as np
import pytest

from evalstream.service.compare import weights
from evalstream.service.compare.bootstrap import paired_bootstrap, unpaired_bootstrap
from evalstream.service.compare.statistics import Statistic, statistic_for
from evalstream.service.compare.weights import POISSON_TABLE, reference_weights, weight_blocks
from evalstream.service.engine.records import Records
from tests.compare.synth import CONFIG, records_of, world

N, C, R = 1501, 20, 300


def test_poisson_table_has_mean_and_variance_one() -> None:
    assert POISSON_TABLE.mean() == pytest.approx(1.0, abs=1e-4)
    assert POISSON_TABLE.var() == pytest.approx(1.0, abs=1e-3)


def test_blocks_do_not_change_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(weights, "BLOCK_ELEMENTS", 3 * N)  # 3 replicates a block
    blocks = list(weight_blocks(11, 10, N))
    assert [len(b) for b in blocks] == [3, 3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(blocks), reference_weights(11, 10, N))


@pytest.fixture(scope="module")
def pair() -> tuple[Records, Records]:
    logits, labels = world(N, C, seed=3)
    rng = np.random.default_rng(4)
    a = records_of(logits, labels, np.arange(N))
    b = records_of(logits + 1.5 * rng.standard_normal(logits.shape), labels, np.arange(N))
    return a, b


def _stat(name: str, records: Records) -> Statistic:
    stat = statistic_for(name, records, C, CONFIG)
    assert stat is not None
    return stat


def _ece(w: np.ndarray, conf: np.ndarray, correct: np.ndarray, bins: int = 15) -> float:
    """Plain weighted ECE with (lo, hi] bins."""
    idx = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    gap = np.bincount(idx, weights=w * (conf - correct), minlength=bins)
    return float(np.abs(gap).sum() / w.sum())


def _reference_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def test_paired_nll_interval_matches_numpy_reference(pair: tuple[Records, Records]) -> None:
    a, b = pair
    stats = [_stat("nll", r) for r in (a, b)]
    got = paired_bootstrap(stats, 0, N, R, 0.9, seed=5)
    w = reference_weights(5, R, N).astype(np.float64)
    d = b.nll.astype(np.float64) - a.nll.astype(np.float64)
    reps = (w @ d) / w.sum(axis=1)
    lo, hi = _reference_interval(reps, 0.9)
    assert got[0].estimate == 0.0 and got[0].lower == got[0].upper == 0.0
    assert got[1].estimate == pytest.approx(d.mean(), rel=1e-9)
    assert got[1].lower == pytest.approx(lo, rel=1e-5)
    assert got[1].upper == pytest.approx(hi, rel=1e-5)
    assert got[1].level == 0.9


def test_paired_ece_interval_matches_numpy_reference(pair: tuple[Records, Records]) -> None:
    a, b = pair
    stats = [_stat("ece", r) for r in (a, b)]
    got = paired_bootstrap(stats, 1, N, R, 0.95, seed=9)
    w = reference_weights(9, R, N).astype(np.float64)
    ca, cb = (r.confidence.astype(np.float64) for r in (a, b))
    reps = np.array([_ece(w[r], ca, a.correct) - _ece(w[r], cb, b.correct) for r in range(R)])
    lo, hi = _reference_interval(reps, 0.95)
    assert got[0].lower == pytest.approx(lo, rel=1e-4, abs=1e-7)
    assert got[0].upper == pytest.approx(hi, rel=1e-4, abs=1e-7)


def test_unpaired_interval_uses_independent_streams(pair: tuple[Records, Records]) -> None:
    a, b = pair
    stats = [_stat("accuracy_top1", r) for r in (a, b)]
    got = unpaired_bootstrap(stats, [N, N], 0, R, 0.95, seed=2)
    wa, wb = (reference_weights(2 + i, R, N).astype(np.float64) for i in range(2))
    xa, xb = (r.correct.astype(np.float64) for r in (a, b))
    reps = (wb @ xb) / wb.sum(axis=1) - (wa @ xa) / wa.sum(axis=1)
    lo, hi = _reference_interval(reps, 0.95)
    assert got[1].lower == pytest.approx(lo, rel=1e-5)
    assert got[1].upper == pytest.approx(hi, rel=1e-5)
    # Unpaired intervals are wider than paired ones on the same data (no shared noise cancels).
    paired = paired_bootstrap(stats, 0, N, R, 0.95, seed=2)
    assert got[1].upper - got[1].lower > paired[1].upper - paired[1].lower


def test_same_seed_same_interval_other_seed_other(pair: tuple[Records, Records]) -> None:
    a, b = pair
    stats = [_stat("calibrated_nll", r) for r in (a, b)]
    first = paired_bootstrap(stats, 0, N, 100, 0.95, seed=1)
    again = paired_bootstrap(stats, 0, N, 100, 0.95, seed=1)
    other = paired_bootstrap(stats, 0, N, 100, 0.95, seed=2)
    assert first == again
    assert first[1].lower != other[1].lower
