"""Rendering: verdict first, a readable table; the plot writes a PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from evalstream.client.compare_view import comparison_figure, plot_comparison, render_comparison
from evalstream.service.compare import CandidateInput, CompareOptions, compare_models
from evalstream.service.convert import result_from_report
from evalstream.service.engine.metrics import compute_metrics
from evalstream.v1 import compare_pb2, evaluation_pb2, service_pb2
from tests.compare.synth import CONFIG, candidate, world
from tests.compare.test_compare import three_variants

N, C = 4000, 60
IDS = np.arange(N)
Compared = tuple[service_pb2.CompareModelsResponse, list[CandidateInput]]


@pytest.fixture(scope="module")
def compared() -> Compared:
    base, sharp, _ = three_variants()
    # The sharper variant has the higher accuracy and fails an ECE bound.
    gate = compare_pb2.Gate(upper_bounds={"ece": 0.05})
    resp = compare_models([sharp, base], CompareOptions(replicates=200, gate=gate), baseline=base)
    return resp, [base, sharp]


def _evaluations(cands: list[CandidateInput]) -> dict[str, evaluation_pb2.Evaluation]:
    out = {}
    for c in cands:
        assert c.records is not None
        report = compute_metrics(c.records, c.num_classes, CONFIG)
        out[c.evaluation_id] = evaluation_pb2.Evaluation(
            evaluation_id=c.evaluation_id, result=result_from_report(report)
        )
    return out


def test_verdict_comes_first_then_the_table(compared: Compared) -> None:
    resp, _ = compared
    text = render_comparison(resp)
    lines = text.splitlines()
    assert lines[0].startswith("Recommendation: Pick sharp at T=")
    header = next(i for i, line in enumerate(lines) if line.startswith("#"))
    assert "NLL@T*" in lines[header] and "McNemar p" in lines[header] and "gate" in lines[header]
    assert lines[header + 2].split()[:2] == ["1", "base"]
    assert lines[header + 3].split()[:2] == ["2", "sharp"]
    assert "FAIL" in lines[header + 3] and " *" in lines[header + 3]
    assert "gate: sharp fails:" in text and "ece " in text.split("gate: sharp fails:")[1]
    assert "Where loss and accuracy disagree:" in text and "confidence scale" in text
    flips = resp.diagnoses[0].flips
    assert f"alone right: base {flips.a_right_b_wrong:,}, sharp {flips.b_right_a_wrong:,}" in text
    assert "Causes (each defined by its number in docs/compare.md):" in text
    assert "  - confidently_wrong: sharp errs with high confidence" in text
    assert "Per-class recall of sharp" in text and "vs base:" in text
    assert max(len(line) for line in lines) <= 120


def test_three_under_confident_candidates_fit_one_screen_recommendation_first() -> None:
    """The motivating report: three under-confident variants whose loss and accuracy disagree."""
    logits, labels = world(N, C, seed=1, sharpness=2.0)
    rng = np.random.default_rng(5)
    cands = [
        candidate("timid", 0.35 * logits, labels, IDS),
        candidate("hedged", 0.6 * (logits + rng.standard_normal(logits.shape)), labels, IDS),
        candidate("noisy", 0.5 * (logits + 1.5 * rng.standard_normal(logits.shape)), labels, IDS),
    ]
    resp = compare_models(cands, CompareOptions(replicates=200))
    text = render_comparison(resp)
    lines = text.splitlines()
    assert lines[0].startswith(f"Recommendation: {resp.recommendation.text[:40]}")
    assert len(lines) <= 50 and max(len(line) for line in lines) <= 120
    # Shared causes once: "all three are under-confident", never once per pair.
    assert text.count("under-confident:") == 1 and "All three are under-confident" in text
    assert "confidently_wrong" not in text


def test_advisory_keeps_the_primary_ranking_first(compared: Compared) -> None:
    _, cands = compared
    resp = compare_models(cands, CompareOptions(replicates=100, recommendation="advisory"))
    lines = render_comparison(resp).splitlines()
    assert lines[0] == "base is best by nll (the primary metric decides)."
    assert lines[1].startswith("Advice: Pick sharp at T=")


def test_plot_writes_a_png(compared: Compared, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    resp, cands = compared
    out = tmp_path / "compare.png"
    plot_comparison(resp, _evaluations(cands), str(out))
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_title_is_the_recommendation_and_each_t_star_is_marked(compared: Compared) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    resp, cands = compared
    fig = comparison_figure(resp, _evaluations(cands))
    try:
        assert fig._suptitle.get_text().replace("\n", " ") == resp.recommendation.text
        temperature_panel = fig.axes[1]
        vertical = {
            line.get_xdata()[0] for line in temperature_panel.lines if len(set(line.get_xdata())) == 1
        }
        for c in resp.candidates:
            assert any(abs(x - c.metrics["best_temperature"]) < 1e-9 for x in vertical)
    finally:
        plt.close(fig)
