"""compare_models on candidates with known properties, built through the real engine."""

from __future__ import annotations

import math

import numpy as np
import pytest

from evalstream.service.compare import CandidateInput, CompareError, CompareOptions, compare, compare_models
from evalstream.v1 import compare_pb2
from tests.compare.synth import candidate, sample_labels, world, zipf_prior

N, C = 4000, 60
IDS = np.arange(N)
FAST = CompareOptions(replicates=300)


@pytest.fixture(scope="module")
def truth() -> tuple[np.ndarray, np.ndarray]:
    return world(N, C, seed=0, sharpness=2.0)


def test_temperature_scaled_copy_same_accuracy_higher_loss_and_t_star_recovers_scale(
    truth: tuple[np.ndarray, np.ndarray],
) -> None:
    logits, labels = truth
    calibrated = candidate("calibrated", logits, labels, IDS)
    for scale in (2.0, 1.6):
        sharp = candidate(f"sharp{scale}", scale * logits, labels, IDS)
        result = compare([sharp, calibrated], FAST)
        best, other = result.candidates
        assert best.name == "calibrated" and other.name == sharp.model
        assert other.metrics["accuracy_top1"] == best.metrics["accuracy_top1"]
        ratio = other.metrics["best_temperature"] / best.metrics["best_temperature"]
        assert ratio == pytest.approx(scale, rel=0.05)
        assert other.distinguishable and other.interval is not None and other.interval.lower > 0
        # Same predictions: no discordant pairs, nothing for McNemar to see.
        assert other.mcnemar_p == 1.0
        assert result.diagnoses == []  # accuracy ties, so loss and accuracy do not disagree


def test_identical_models_are_not_distinguishable(truth: tuple[np.ndarray, np.ndarray]) -> None:
    logits, labels = truth
    a = candidate("a", logits, labels, IDS)
    b = candidate("b", logits, labels, IDS)
    result = compare([b, a], FAST)
    assert [c.name for c in result.candidates] == ["a", "b"]  # full tie: by name
    second = result.candidates[1]
    assert not second.distinguishable
    assert second.interval is not None and second.interval.lower == second.interval.upper == 0.0
    assert "No candidate is distinguishable" in result.verdict


def test_clearly_better_model_is_distinguishable(truth: tuple[np.ndarray, np.ndarray]) -> None:
    logits, labels = truth
    rng = np.random.default_rng(1)
    good = candidate("good", logits, labels, IDS)
    noisy = candidate("noisy", 0.6 * (logits + 2.0 * rng.standard_normal(logits.shape)), labels, IDS)
    result = compare([noisy, good], CompareOptions(replicates=300, primary_metric="accuracy_top1"))
    assert result.candidates[0].name == "good"
    worse = result.candidates[1]
    assert worse.distinguishable
    assert worse.interval is not None and worse.interval.upper < 0  # accuracy difference, candidate - best
    assert worse.mcnemar_p is not None and worse.mcnemar_p < 1e-6
    assert worse.rank_by_metric["accuracy_top1"] == 2 and worse.delta_to_best["accuracy_top1"] < 0


def majority_world(seed: int = 3) -> tuple[CandidateInput, CandidateInput]:
    rng = np.random.default_rng(seed)
    likelihood = 2.0 * rng.standard_normal((N, C))
    prior = np.log(zipf_prior(C, 1.2))
    labels = sample_labels(likelihood + prior, rng)
    balanced = candidate("balanced", likelihood + 0.3 * prior, labels, IDS)
    majority = candidate("majority", 2.0 * (likelihood + prior), labels, IDS)
    return balanced, majority


def test_majority_model_higher_accuracy_lower_balanced_accuracy_diagnosed() -> None:
    balanced, majority = majority_world()
    result = compare([majority, balanced], FAST)
    by_name = {c.name: c for c in result.candidates}
    assert by_name["majority"].metrics["accuracy_top1"] > by_name["balanced"].metrics["accuracy_top1"]
    assert by_name["majority"].metrics["balanced_accuracy"] < by_name["balanced"].metrics["balanced_accuracy"]
    assert by_name["majority"].rank_by_metric["accuracy_top1"] == 1
    assert by_name["majority"].rank_by_metric["balanced_accuracy"] == 2
    [diag] = result.diagnoses
    assert (diag.model_a, diag.model_b) == ("balanced", "majority")  # A: lower loss, B: higher accuracy
    assert "majority_bias" in diag.causes
    finding = diag.findings[diag.causes.index("majority_bias")]
    assert "balanced accuracy" in finding and "frequent classes" in finding
    assert diag.flips is not None
    assert diag.flips.b_right_a_wrong > diag.flips.a_right_b_wrong


def three_variants() -> tuple[CandidateInput, CandidateInput, np.ndarray]:
    """The motivating case: a calibrated baseline, a sharper more accurate variant, a prior-biased one."""
    logits, labels = world(N, C, seed=1, sharpness=2.0)
    rng = np.random.default_rng(5)
    noisy = logits + rng.standard_normal(logits.shape)
    base = candidate("base", 0.8 * noisy, labels, IDS)
    sharp = candidate("sharp", 2.2 * (logits + 0.5 * rng.standard_normal(logits.shape)), labels, IDS)
    return base, sharp, labels


def test_confidence_scale_diagnosis_when_calibrated_nll_reverses_the_loss_ranking() -> None:
    base, sharp, _ = three_variants()
    result = compare([base, sharp], FAST)
    assert result.candidates[0].name == "base"  # lower loss
    assert sharp.metrics["accuracy_top1"] > base.metrics["accuracy_top1"]
    [diag] = result.diagnoses
    assert diag.causes[:2] == ["confidence_scale", "confidently_wrong"]
    assert {c.name for c in result.causes} >= {"overconfident", "confidently_wrong"}
    assert sharp.metrics["calibrated_nll"] < base.metrics["calibrated_nll"]
    assert "temperature scaling fixes" in diag.findings[0]
    assert "after temperature scaling" in result.verdict


def test_response_message_carries_everything() -> None:
    base, sharp, _ = three_variants()
    gate = compare_pb2.Gate(upper_bounds={"ece": 0.05})
    options = CompareOptions(replicates=200, seed=42, gate=gate)
    resp = compare_models([sharp, base], options, baseline=base)
    assert resp.primary_metric == "nll" and not resp.higher_is_better
    assert resp.paired and resp.common_samples == N
    assert resp.bootstrap_replicates == 200 and resp.seed == 42
    assert [c.ref.model for c in resp.candidates] == ["base", "sharp"]
    top, second = resp.candidates
    assert top.rank == 1 and not top.distinguishable_from_best and math.isnan(top.mcnemar_p_value)
    assert second.HasField("primary_difference") and second.primary_difference.level == 0.95
    assert second.samples_used == N and 0.0 <= second.mcnemar_p_value <= 1.0
    assert top.gate.passed and not second.gate.passed
    assert any("ece" in r for r in second.gate.reasons)
    assert resp.diagnoses[0].paired and resp.diagnoses[0].flips.b_right_a_wrong > 0
    assert resp.diagnoses[0].loss_b.mean_wrong == pytest.approx(sharp.metrics["nll_wrong"])
    assert any(
        a.metric_a == "nll" and a.metric_b == "accuracy_top1" and a.kendall_tau == -1.0
        for a in resp.agreements
    )
    assert resp.verdict.startswith("Pick sharp at T=") and "By nll, base ranks first" in resp.verdict
    assert resp.recommendation.model == "sharp" and resp.recommendation.basis == "calibrated_nll"
    # Seeded: the same request gives the same response.
    assert compare_models([sharp, base], options, baseline=base) == resp


def test_common_ids_only_and_metrics_recomputed() -> None:
    logits, labels = world(N, C, seed=2, sharpness=2.0)
    a = candidate("a", logits[: N - 500], labels[: N - 500], IDS[: N - 500])
    b = candidate("b", 1.3 * logits[300:], labels[300:], IDS[300:])
    result = compare([a, b], FAST)
    assert result.paired and result.common_samples == N - 800
    assert all(c.samples_used == N - 800 for c in result.candidates)
    shared = candidate("a", logits[300 : N - 500], labels[300 : N - 500], IDS[300 : N - 500])
    got = next(c for c in result.candidates if c.name == "a").metrics
    assert got["nll"] == pytest.approx(shared.metrics["nll"], rel=1e-9)


def test_without_ids_the_bootstrap_is_unpaired_and_says_so(truth: tuple[np.ndarray, np.ndarray]) -> None:
    logits, labels = truth
    a = candidate("a", logits, labels)
    b = candidate("b", 1.5 * logits, labels)
    result = compare([a, b], FAST)
    assert not result.paired and result.common_samples == 0
    assert result.candidates[1].interval is not None and result.candidates[1].mcnemar_p is None
    assert "unpaired bootstrap" in result.verdict
    assert result.diagnoses == [] or result.diagnoses[0].flips is None


def test_without_records_ranked_on_stored_metrics_only(truth: tuple[np.ndarray, np.ndarray]) -> None:
    logits, labels = truth
    a = candidate("a", logits, labels, IDS)
    b = candidate("b", 1.5 * logits, labels, IDS, keep_records=False)
    result = compare([a, b], FAST)
    assert [c.name for c in result.candidates] == ["a", "b"]
    assert result.candidates[1].interval is None and not result.candidates[1].distinguishable
    assert result.candidates[1].samples_used == 0
    assert "ranked on stored metrics only" in result.verdict


def test_unknown_metric_lists_valid_names(truth: tuple[np.ndarray, np.ndarray]) -> None:
    logits, labels = truth
    a = candidate("a", logits, labels, IDS)
    with pytest.raises(CompareError) as err:
        compare([a], CompareOptions(primary_metric="accuracy"))
    assert err.value.code == "INVALID_ARGUMENT"
    assert "accuracy_top1" in err.value.message and "balanced_accuracy" in err.value.message


def test_preconditions(truth: tuple[np.ndarray, np.ndarray]) -> None:
    logits, labels = truth
    a = candidate("a", logits, labels, IDS)
    other_split = candidate("b", logits, labels, IDS, split="test")
    with pytest.raises(CompareError) as err:
        compare([a, other_split], FAST)
    assert err.value.code == "FAILED_PRECONDITION" and "split" in err.value.message
    disjoint = candidate("c", logits, labels, IDS + N)
    with pytest.raises(CompareError) as err:
        compare([a, disjoint], FAST)
    assert err.value.code == "FAILED_PRECONDITION" and "share no sample ids" in err.value.message
    with pytest.raises(CompareError) as err:
        compare([], FAST)
    assert err.value.code == "INVALID_ARGUMENT"
    with pytest.raises(CompareError) as err:
        compare([a], CompareOptions(gate=compare_pb2.Gate()))
    assert err.value.code == "INVALID_ARGUMENT" and "baseline" in err.value.message


def test_single_candidate_gated_against_baseline(truth: tuple[np.ndarray, np.ndarray]) -> None:
    logits, labels = truth
    base = candidate("base", 1.5 * logits, labels, IDS)
    new = candidate("new", logits, labels, IDS)
    gate = compare_pb2.Gate(min_relative_improvement=0.5)
    [only] = compare([new], CompareOptions(replicates=50, gate=gate), baseline=base).candidates
    assert only.gate is not None and not only.gate.passed
    assert "relative improvement" in only.gate.reasons[0]


def test_reference_case_3000_classes() -> None:
    n, classes = 3000, 3000
    logits, labels = world(n, classes, seed=9, sharpness=3.0)
    ids = np.arange(n)
    a = candidate("a", logits, labels, ids)
    b = candidate("b", 1.8 * logits, labels, ids)
    result = compare([a, b], CompareOptions(replicates=200, primary_metric="balanced_accuracy"))
    assert (
        result.candidates[0].metrics["balanced_accuracy"] == result.candidates[1].metrics["balanced_accuracy"]
    )
    assert not result.candidates[1].distinguishable
    assert result.candidates[0].name == "a"  # tie broken by the secondary metric, then by name
