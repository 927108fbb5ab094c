"""Weighted statistics equal the engine's metrics: at unit weights, and at integer weights on the
records repeated that many times (what a bootstrap resample is)."""

from __future__ import annotations

import numpy as np
import pytest

from evalstream.service.compare.statistics import Statistic, statistic_for
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.records import Records
from evalstream.service.engine.registry import metric_infos
from tests.compare.synth import CONFIG, records_of, world

N, C = 3000, 40
RANKING = sorted(n for n, i in metric_infos(CONFIG.top_k).items() if i.higher_is_better is not None)
# Fixed by the full sample (bins / class buckets) or quantiles: equal at unit weights only.
FULL_SAMPLE_DEFINED = {"adaptive_ece", "accuracy_head", "accuracy_torso", "accuracy_tail"}
QUANTILES = {"nll_p50", "nll_p90", "nll_p99"}


def _stat(name: str, records: Records) -> Statistic:
    stat = statistic_for(name, records, C, CONFIG)
    assert stat is not None
    return stat


@pytest.fixture(scope="module", params=["tie-free", "tied"])
def records(request: pytest.FixtureRequest) -> Records:
    """Tie-free logits, and the same rounded to steps of 1/2 so that many labels tie another
    class (the statistics must count top-1 credit exactly as the engine does)."""
    logits, labels = world(N, C, seed=7)
    scores = 1.5 * logits
    if request.param == "tied":
        scores = np.round(2.0 * scores) / 2.0
    recs = records_of(scores, labels, np.arange(N))
    assert recs.tied.any() == (request.param == "tied")
    return recs


def test_every_ranking_metric_has_a_statistic(records: Records) -> None:
    missing = [n for n in RANKING if statistic_for(n, records, C, CONFIG) is None]
    assert missing == []


@pytest.mark.parametrize("name", RANKING)
def test_unit_weights_equal_engine(records: Records, name: str) -> None:
    expected = compute_metrics(records, C, CONFIG).scalars()[name]
    got = _stat(name, records).point(len(records))
    if name in QUANTILES:
        # Lower inverted CDF vs linear interpolation: within one gap between sorted values.
        s = np.sort(records.nll.astype(np.float64))
        assert abs(got - expected) <= np.max(np.diff(s)) + 1e-9
    else:
        assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", [n for n in RANKING if n not in FULL_SAMPLE_DEFINED | QUANTILES])
def test_integer_weights_equal_engine_on_repeated_samples(records: Records, name: str) -> None:
    rng = np.random.default_rng(1)
    w = rng.poisson(1.0, size=(3, len(records))).astype(np.float32)
    got = _stat(name, records).evaluate(w)
    for r in range(3):
        repeated = records.take(np.repeat(np.arange(len(records)), w[r].astype(np.int64)))
        expected = compute_metrics(repeated, C, CONFIG, dedupe=False).scalars()[name]
        assert got[r] == pytest.approx(expected, rel=1e-5, abs=1e-6)
