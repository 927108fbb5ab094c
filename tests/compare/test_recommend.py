"""The recommendation rule (docs/compare.md): rankings that disagree, agree, or show nothing real;
and the three modes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evalstream.service.compare import CompareError, CompareOptions, compare, compare_models
from evalstream.service.compare.bootstrap import Interval
from evalstream.service.compare.recommend import recommend
from evalstream.service.compare.temperature import sample_nll_at
from evalstream.v1 import compare_pb2
from tests.compare.synth import candidate, world
from tests.compare.test_compare import three_variants

N, C = 4000, 60
IDS = np.arange(N)


def test_disagreeing_rankings_recommend_the_calibrated_best_with_its_temperature() -> None:
    base, sharp, _ = three_variants()
    result = compare([base, sharp], CompareOptions(replicates=200))
    assert result.candidates[0].name == "base"  # best by nll, the primary metric
    rec = result.recommendation
    assert rec is not None and rec.mode == "on"
    assert rec.model == "sharp" and rec.basis == "calibrated_nll" and rec.rankings_disagree
    assert rec.temperature == sharp.metrics["best_temperature"]
    assert rec.accuracy_agrees  # sharp is also the more accurate
    iv = rec.calibrated_differences["base"]
    # The interval is for calibrated NLL (base - sharp) at each model's own T*; it excludes 0.
    assert iv.lower > 0
    assert iv.estimate == pytest.approx(
        base.metrics["calibrated_nll"] - sharp.metrics["calibrated_nll"], abs=1e-9
    )
    assert result.verdict.startswith(f"Pick sharp at T={sharp.metrics['best_temperature']:.2f}")
    assert "also the most accurate" in rec.text
    assert "By nll, base ranks first" in result.verdict


def test_sample_nll_at_t_star_averages_to_the_engines_calibrated_nll() -> None:
    base, sharp, _ = three_variants()
    for c in (base, sharp):
        assert c.records is not None
        got = sample_nll_at(c.records, c.metrics["best_temperature"]).mean()
        assert got == pytest.approx(c.metrics["calibrated_nll"], abs=1e-6)


def test_agreeing_rankings_recommend_the_best() -> None:
    logits, labels = world(N, C, seed=0, sharpness=2.0)
    rng = np.random.default_rng(1)
    good = candidate("good", logits, labels, IDS)
    noisy = candidate("noisy", 0.6 * (logits + 2.0 * rng.standard_normal(logits.shape)), labels, IDS)
    rec = compare([noisy, good], CompareOptions(replicates=200)).recommendation
    assert rec is not None and rec.model == "good" and rec.basis == "primary" and not rec.rankings_disagree
    assert rec.text.startswith("Pick good (deploy at T=")


def test_nothing_significant_recommends_nothing() -> None:
    logits, labels = world(N, C, seed=0, sharpness=2.0)
    rng = np.random.default_rng(2)
    a = candidate("a", logits, labels, IDS)
    b = candidate("b", logits + 0.01 * rng.standard_normal(logits.shape), labels, IDS)
    result = compare([a, b], CompareOptions(replicates=200))
    rec = result.recommendation
    assert rec is not None and rec.index is None and rec.model == "" and rec.basis == "none"
    assert not any(c.distinguishable for c in result.candidates)
    assert not any(iv.excludes_zero for iv in rec.calibrated_differences.values())
    assert rec.text.startswith("No model is distinguishable")
    resp = compare_models([a, b], CompareOptions(replicates=200))
    assert resp.recommendation.basis == "none" and not resp.recommendation.HasField("ref")


def test_modes_off_and_advisory() -> None:
    base, sharp, _ = three_variants()
    off = compare_models([base, sharp], CompareOptions(replicates=100, recommendation="off"))
    assert not off.HasField("recommendation")
    assert off.verdict.startswith("base is best by nll")
    advisory = compare_models([base, sharp], CompareOptions(replicates=100, recommendation="advisory"))
    rec = advisory.recommendation
    assert rec.mode == compare_pb2.RECOMMENDATION_MODE_ADVISORY and rec.model == "sharp"
    assert rec.ref.model == "sharp" and rec.evaluation_id == sharp.evaluation_id
    assert advisory.verdict.startswith("base is best by nll") and f"Advice: {rec.text}" in advisory.verdict
    on = compare_models([base, sharp], CompareOptions(replicates=100))
    assert on.recommendation.mode == compare_pb2.RECOMMENDATION_MODE_ON
    assert on.verdict.startswith(on.recommendation.text)
    assert math.isclose(on.recommendation.temperature, sharp.metrics["best_temperature"])
    with pytest.raises(CompareError) as err:
        compare([base, sharp], CompareOptions(recommendation="sometimes"))
    assert err.value.code == "INVALID_ARGUMENT" and "advisory" in err.value.message


def _iv(lower: float, upper: float) -> Interval:
    return Interval((lower + upper) / 2, lower, upper, 0.95)


def test_disagreeing_rankings_without_a_significant_calibrated_lead() -> None:
    """Rules 3 and 4 on the rule's own inputs: P leads by the primary metric, K after scaling."""
    metrics = [
        {"calibrated_nll": 1.00, "accuracy_top1": 0.50, "best_temperature": 1.3},
        {"calibrated_nll": 0.99, "accuracy_top1": 0.60, "best_temperature": 0.8},
    ]
    names, order, calibrated = ["p", "k"], [0, 1], {0: _iv(-0.01, 0.03)}  # p - k on calibrated NLL
    rec = recommend("on", names, metrics, order, "nll", {0: False, 1: True}, calibrated, 1)
    assert rec is not None and rec.model == "p" and rec.basis == "primary" and rec.rankings_disagree
    assert rec.temperature == 1.3 and "not significant" in rec.text
    assert "Top-1 accuracy also favours k" in rec.text
    rec = recommend("on", names, metrics, order, "nll", {0: False, 1: False}, calibrated, 1)
    assert rec is not None and rec.model == "" and rec.basis == "none"
    assert rec.text.startswith("No model can be recommended over the others")
    assert recommend("off", names, metrics, order, "nll", {}, calibrated, 1) is None
