"""Causes are true: each holds exactly when its defining number crosses its threshold.

Purpose-built candidates through the real engine: an under-confident pair whose
more accurate model pays more per error (the old "confidently wrong" rule fired
on that alone), an over-confident model whose errors carry high confidence, and
a prior-biased model that is not the more accurate one.
"""

from __future__ import annotations

import numpy as np
import pytest

from evalstream.service.compare import CompareOptions, compare, compare_models
from evalstream.service.compare.causes import CONFIDENT_ERROR, MAJORITY_GAP, TEMPERATURE_MARGIN
from evalstream.service.engine.records import Records
from tests.compare.synth import candidate, sample_labels, world, zipf_prior
from tests.compare.test_compare import three_variants

N, C = 4000, 60
IDS = np.arange(N)
FAST = CompareOptions(replicates=200)


def _mean_confidence_on_errors(records: Records) -> float:
    """Mean top-1 confidence where argmax != label (these scores have no ties)."""
    assert not records.ties.any()
    return float(records.confidence[~records.correct].astype(np.float64).mean())


def test_under_confident_pair_is_never_called_confidently_wrong() -> None:
    logits, labels = world(N, C, seed=1, sharpness=2.0)
    rng = np.random.default_rng(5)
    hedged = candidate("hedged", 0.6 * (logits + rng.standard_normal(logits.shape)), labels, IDS)
    timid = candidate("timid", 0.35 * logits, labels, IDS)
    result = compare([hedged, timid], FAST)
    m = {c.name: c.metrics for c in result.candidates}
    # The pair disagrees, and the more accurate model pays more per error: what the old rule read
    # as "confidently wrong".
    assert (
        m["hedged"]["nll"] < m["timid"]["nll"] and m["hedged"]["accuracy_top1"] < m["timid"]["accuracy_top1"]
    )
    assert m["timid"]["nll_wrong"] > m["hedged"]["nll_wrong"]
    causes = {c.name: c for c in result.causes}
    assert "confidently_wrong" not in causes
    [diag] = result.diagnoses
    assert "confidently_wrong" not in diag.causes
    # What is true instead: both are under-confident, and the gap is on correct predictions.
    under = causes["underconfident"]
    assert sorted(under.models) == ["hedged", "timid"]
    assert all(under.values[n] < 1 / TEMPERATURE_MARGIN for n in under.models)
    assert under.values["timid"] == m["timid"]["best_temperature"]
    assert (
        f"{m['timid']['best_temperature']:.2f}" in under.finding
        and "Both are under-confident" in under.finding
    )
    low = causes["low_confidence_correct"]
    assert low.models == ["timid"] and low.values["timid vs hedged"] >= 0.5
    assert "low_confidence_correct" in diag.causes and "underconfident" in diag.causes
    # Each cause is stated once in the verdict, not once per pair.
    assert result.verdict.count("under-confident") == 1


def test_over_confident_model_with_confident_errors_is_confidently_wrong() -> None:
    base, sharp, _ = three_variants()
    result = compare([base, sharp], FAST)
    causes = {c.name: c for c in result.causes}
    wrong = causes["confidently_wrong"]
    assert wrong.models == ["sharp"]
    assert sharp.records is not None and base.records is not None
    assert wrong.values["sharp"] == pytest.approx(_mean_confidence_on_errors(sharp.records), rel=1e-12)
    assert wrong.values["base"] == pytest.approx(_mean_confidence_on_errors(base.records), rel=1e-12)
    assert wrong.values["sharp"] >= CONFIDENT_ERROR > wrong.values["base"]
    assert causes["overconfident"].models == ["sharp"]
    assert causes["overconfident"].values["sharp"] > TEMPERATURE_MARGIN
    [diag] = result.diagnoses
    assert {"confidence_scale", "confidently_wrong", "overconfident"} <= set(diag.causes)
    assert "underconfident" not in causes


def test_prior_biased_model_is_flagged_even_when_less_accurate() -> None:
    rng = np.random.default_rng(3)
    likelihood = 2.0 * rng.standard_normal((N, C))
    prior = np.log(zipf_prior(C, 1.2))
    labels = sample_labels(likelihood + prior, rng)
    good = candidate("good", likelihood + 0.5 * prior, labels, IDS)
    flat = candidate("flat", likelihood, labels, IDS)
    biased = candidate("biased", 0.4 * likelihood + 2.0 * prior, labels, IDS)
    result = compare([good, flat, biased], FAST)
    m = {c.name: c.metrics for c in result.candidates}
    # The least accurate of the three: no pair has it on the higher-accuracy side.
    assert m["biased"]["accuracy_top1"] < min(m["good"]["accuracy_top1"], m["flat"]["accuracy_top1"])
    bias = next(c for c in result.causes if c.name == "majority_bias")
    assert bias.models == ["biased"]
    gaps = {n: m[n]["accuracy_top1"] - m[n]["balanced_accuracy"] for n in m}
    assert bias.values == gaps
    assert gaps["biased"] - float(np.median([gaps["good"], gaps["flat"]])) >= MAJORITY_GAP
    assert "biased's accuracy is carried by frequent classes" in bias.finding


def test_causes_are_in_the_response_with_their_numbers() -> None:
    base, sharp, _ = three_variants()
    resp = compare_models([base, sharp], FAST)
    by_name = {c.name: c for c in resp.causes}
    assert by_name["overconfident"].quantity == "best_temperature"
    assert by_name["overconfident"].threshold == TEMPERATURE_MARGIN
    assert by_name["confidently_wrong"].values["sharp"] >= CONFIDENT_ERROR
    assert all(c.finding for c in resp.causes)
