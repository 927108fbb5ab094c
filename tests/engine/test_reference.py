"""Every record field and every metric against the independent float64 reference (1e-6 relative)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support

from evalstream.service.engine import EngineConfig
from evalstream.service.engine.metrics import compute_metrics, running_summary
from evalstream.service.engine.reducer import ChunkReducer
from tests.engine import reference as ref
from tests.engine.data import TEST_CONFIG, make_data

CASES = [(10, 3000, 1), (100, 3000, 2), (3000, 1500, 3)]
RTOL = 1e-6


@pytest.fixture(scope="module", params=CASES, ids=[f"C{c}" for c, _, _ in CASES])
def case(request: pytest.FixtureRequest) -> tuple:
    c, n, seed = request.param
    data = make_data(c, n, seed)
    recs = ChunkReducer(c, TEST_CONFIG).reduce(data.logits, data.labels, data.sample_ids)
    expected = ref.per_sample(data.logits, data.labels, np.asarray(TEST_CONFIG.inverse_temperatures))
    return c, data, recs, expected, compute_metrics(recs, c, TEST_CONFIG)


def test_records_match_reference(case: tuple) -> None:
    _, data, recs, exp, _ = case
    np.testing.assert_array_equal(recs.rank, exp["rank"])
    np.testing.assert_array_equal(recs.ties, exp["ties"])
    assert not recs.ties.any()  # tie-free data: credit and the binary view are today's 0/1
    np.testing.assert_array_equal(recs.pred, exp["pred"])
    np.testing.assert_array_equal(recs.label, data.labels)
    np.testing.assert_array_equal(recs.sample_id, data.sample_ids)
    # float32 storage: each value to a few float32 ulps of its magnitude.
    for name in ("nll", "confidence", "brier", "entropy"):
        got = getattr(recs, name).astype(np.float64)
        np.testing.assert_allclose(got, exp[name], rtol=2e-6, atol=2e-6, err_msg=name)
    # The model's powers are products of one exponential (about k/2 ulps at b = k/20), its
    # derivatives float16 (half an ulp: 4.9e-4 relative), and its NLL at a grid point carries the
    # float32 margin (nll + log confidence) times b <= 20.
    np.testing.assert_allclose(recs.log_rest, exp["log_rest"], rtol=3e-5, atol=3e-5)
    np.testing.assert_allclose(recs.rest_slope, exp["rest_slope"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(recs.rest_curvature, exp["rest_curvature"], rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(recs.nll_t, exp["nll_t"], rtol=2e-6, atol=2e-5)


def test_loss_and_accuracy(case: tuple) -> None:
    _, _, _, exp, rep = case
    nll = exp["nll"]
    correct = exp["rank"] == 0
    assert rep.loss.mean == pytest.approx(nll.mean(), rel=RTOL)
    for q, got in ((50, rep.loss.p50), (90, rep.loss.p90), (99, rep.loss.p99)):
        assert got == pytest.approx(np.percentile(nll, q), rel=RTOL)
    assert rep.loss.mean_correct == pytest.approx(nll[correct].mean(), rel=RTOL)
    assert rep.loss.mean_wrong == pytest.approx(nll[~correct].mean(), rel=RTOL)
    assert rep.loss.share_wrong == pytest.approx(nll[~correct].sum() / nll.sum(), rel=RTOL)
    assert rep.loss.share_correct + rep.loss.share_wrong == pytest.approx(1.0, rel=1e-12)
    assert 0.05 < rep.top_k[1] < 0.95  # the data is informative but not trivial
    for k in (1, 5):
        assert rep.top_k[k] == pytest.approx((exp["rank"] < k).mean(), rel=1e-12)
        assert rep.top_k[k] == pytest.approx(ref.topk_credit(exp["rank"], exp["ties"], k).mean(), rel=1e-12)
    assert rep.brier == pytest.approx(exp["brier"].mean(), rel=RTOL)
    assert rep.entropy == pytest.approx(exp["entropy"].mean(), rel=RTOL)
    assert running_summary(case[2]) == (pytest.approx(nll.sum(), rel=RTOL), int(correct.sum()))


def test_calibration(case: tuple) -> None:
    _, _, _, exp, rep = case
    conf, correct = exp["confidence"], (exp["rank"] == 0).astype(np.float64)
    ece, rms, mce, counts = ref.ece_guo(conf, correct, TEST_CONFIG.num_bins)
    cal = rep.calibration
    assert cal.bin_edges == "(lo, hi]"
    assert [b.count for b in cal.bins] == counts
    assert cal.ece == pytest.approx(ece, rel=RTOL)
    assert cal.rms_ce == pytest.approx(rms, rel=RTOL)
    assert cal.mce == pytest.approx(mce, rel=RTOL)
    assert cal.adaptive_ece == pytest.approx(ref.adaptive_ece(conf, correct, TEST_CONFIG.num_bins), rel=RTOL)
    assert cal.mean_confidence == pytest.approx(conf.mean(), rel=RTOL)
    assert cal.overconfidence == pytest.approx(conf.mean() - correct.mean(), rel=RTOL, abs=1e-9)
    for b in cal.bins:
        in_bin = (conf > b.lower) & (conf <= b.upper)
        if b.count:
            assert b.mean_confidence == pytest.approx(conf[in_bin].mean(), rel=RTOL)
            assert b.accuracy == pytest.approx(correct[in_bin].mean(), rel=RTOL, abs=1e-12)


def test_imbalance_against_sklearn(case: tuple) -> None:
    c, data, _recs, exp, rep = case
    imb = rep.imbalance
    y, pred = data.labels, exp["pred"]
    correct = exp["rank"] == 0
    assert imb.balanced_accuracy == pytest.approx(balanced_accuracy_score(y, pred), rel=RTOL)
    prec, _, f1, _ = precision_recall_fscore_support(y, pred, average="macro", zero_division=0)
    assert imb.macro_precision == pytest.approx(prec, rel=RTOL)
    assert imb.macro_f1 == pytest.approx(f1, rel=RTOL)
    assert imb.classes_present == len(np.unique(y))
    np.testing.assert_array_equal(imb.per_class.support, np.bincount(y, minlength=c))
    np.testing.assert_array_equal(imb.per_class.predicted, np.bincount(pred, minlength=c))
    np.testing.assert_array_equal(imb.per_class.correct, np.bincount(y[correct], minlength=c))
    expected = ref.buckets(y, correct, c)
    assert [(b.num_classes, b.num_samples) for b in imb.buckets] == [(k, s) for k, s, _ in expected]
    for got, (_, _, acc) in zip(imb.buckets, expected, strict=True):
        assert got.accuracy == pytest.approx(acc, rel=RTOL)
    assert sum(b.num_samples for b in imb.buckets) == len(y)
    py = np.bincount(y, minlength=c) / len(y)
    pp = np.bincount(pred, minlength=c) / len(y)
    assert imb.prediction_shift_tv == pytest.approx(0.5 * np.abs(py - pp).sum(), rel=RTOL)
    got_pairs = [(p.label, p.prediction, p.count) for p in imb.top_confusions]
    assert got_pairs == ref.confusions(y, pred, TEST_CONFIG.top_confusions)


def test_temperature_scan(case: tuple) -> None:
    _, _, _, exp, rep = case
    grid = np.asarray(TEST_CONFIG.inverse_temperatures)
    temps = 1.0 / grid[::-1]
    nll = exp["nll_t"].mean(axis=0)[::-1]
    scan = rep.temperature
    np.testing.assert_allclose(scan.temperatures, temps, rtol=1e-15)
    np.testing.assert_allclose(scan.nll, nll, rtol=2e-6)
    # T* and the calibrated NLL: the exact optimum of the float64 logits, to 1% and 1e-4 nats.
    t_star, nll_star = ref.exact_temperature(case[1].logits, case[1].labels)
    assert scan.best_temperature == pytest.approx(t_star, rel=1e-2)
    assert scan.calibrated_nll == pytest.approx(nll_star, abs=1e-4)
    assert scan.calibrated_nll <= min(scan.nll) + 1e-12
    # T = 1 in the scan is the loss itself (to the float32 rounding of the margin).
    assert scan.nll[scan.temperatures.index(1.0)] == pytest.approx(rep.loss.mean, rel=1e-6)


def test_non_dyadic_grid_takes_the_direct_path() -> None:
    cfg = EngineConfig(device="cpu", inverse_temperatures=(0.3, 0.7, 1.0, 1.75, 3.3, 6.0))
    data = make_data(100, 500, 11)
    recs = ChunkReducer(100, cfg).reduce(data.logits, data.labels)
    exp = ref.per_sample(data.logits, data.labels, np.asarray(cfg.inverse_temperatures))
    np.testing.assert_allclose(recs.nll_t, exp["nll_t"], rtol=2e-6, atol=2e-5)


def test_minimal_grid() -> None:
    cfg = EngineConfig(device="cpu", inverse_temperatures=(1.0,), top_k=(1,))
    data = make_data(100, 300, 12)
    recs = ChunkReducer(100, cfg).reduce(data.logits, data.labels)
    rep = compute_metrics(recs, 100, cfg)
    assert recs.nll_t.shape == (300, 1)
    assert rep.temperature.best_temperature == 1.0
    assert rep.temperature.calibrated_nll == pytest.approx(rep.loss.mean, rel=1e-6)
