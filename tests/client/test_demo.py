"""The demo's motivating situation, produced for real: synthetic logits streamed by two ranks
per model through a real server, metrics from the engine, ranking from CompareModels."""

from __future__ import annotations

import json
import math

import numpy as np

from evalstream.client import EvalClient
from evalstream.client.compare_view import render_comparison
from evalstream.client.demo import DemoConfig, demo_json, render_demo, run_demo
from evalstream.client.synthetic import SyntheticValidationSet
from evalstream.service.server import BackgroundServer


def exact_calibrated_nll(data: SyntheticValidationSet, variant: str) -> tuple[float, float]:
    """(T*, NLL at T*) from the logits themselves: golden-section search in float64 over the inverse
    temperature (the mean NLL is convex in it), independent of the service's temperature grid."""
    z = np.concatenate([b[0] for b in data.batches(variant, 1024)]).astype(np.float64)
    zy = z[np.arange(len(z)), data.labels]

    def nll(beta: float) -> float:
        s = beta * z
        top = s.max(axis=1)
        return float(np.mean(top + np.log(np.exp(s - top[:, None]).sum(axis=1)) - beta * zy))

    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(math.exp(a)), nll(math.exp(b))
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(math.exp(b))
    beta = math.exp((lo + hi) / 2)
    return 1.0 / beta, nll(beta)


def test_loss_and_accuracy_rank_the_demo_models_differently(server: BackgroundServer) -> None:
    config = DemoConfig(
        num_samples=4_000, num_classes=3_000, seed=0, world_size=2, batch_size=512, run="demo"
    )
    with EvalClient(server.target) as client:
        result = run_demo(client, config, progress=False)
    assert result.samples == 3 * 4_000
    m = {name: dict(e.result.metrics) for name, e in result.evaluations.items()}
    for e in result.evaluations.values():
        assert e.result.num_samples == 4_000 and e.ranks_closed == 2 and e.result.num_classes == 3_000
    # Lower loss but lower accuracy vs higher accuracy but higher loss.
    assert m["smooth"]["nll"] < m["sharp"]["nll"]
    assert m["smooth"]["accuracy_top1"] + 0.05 < m["sharp"]["accuracy_top1"]
    # sharp is confidently wrong: its errors cost far more than smooth's.
    assert m["sharp"]["nll_wrong"] > 2 * m["smooth"]["nll_wrong"]
    # overconfident: worst calibration, fixed mostly by a temperature > 1.
    assert m["overconfident"]["ece"] == max(v["ece"] for v in m.values())
    assert m["overconfident"]["overconfidence"] > 0.25
    assert m["overconfident"]["best_temperature"] > 1.5
    assert m["overconfident"]["calibrated_nll"] < m["overconfident"]["nll"] - 1.0
    assert m["overconfident"]["nll"] > m["smooth"]["nll"]
    # smooth hedges: underconfident.
    assert m["smooth"]["overconfidence"] < 0
    # The comparison ranks by loss, and knows accuracy disagrees.
    comparison = result.comparison
    assert comparison.primary_metric == "nll" and comparison.paired
    assert comparison.common_samples == 4_000
    assert comparison.candidates[0].ref.model == "smooth"
    tau = {(a.metric_a, a.metric_b): a.kendall_tau for a in comparison.agreements}
    assert any(v < 0 for (x, y), v in tau.items() if "accuracy_top1" in (x, y))
    # The recommendation is right for these models: the one with the lowest NLL at its own exact
    # best temperature, computed here from the logits, at (about) that temperature.
    data = SyntheticValidationSet(num_samples=4_000, num_classes=3_000, seed=0)
    exact = {name: exact_calibrated_nll(data, name) for name in data.variants}
    best = min(exact, key=lambda name: exact[name][1])
    rec = comparison.recommendation
    assert rec.model == best == "overconfident" and rec.basis == "calibrated_nll" and rec.rankings_disagree
    assert rec.accuracy_agrees_with_calibrated
    assert math.isclose(rec.temperature, exact[best][0], rel_tol=0.01)  # exact T* (docs/metrics.md)
    assert rec.text.startswith(f"Pick overconfident at T={rec.temperature:.2f}")
    payload = json.loads(json.dumps(demo_json(result)))
    assert set(payload["models"]) == {"smooth", "sharp", "overconfident"}
    text = render_demo(result, render_comparison(result.comparison, result.evaluations))
    assert "smooth" in text and "streamed 12,000 samples" in text
    assert f"Recommendation: {rec.text[:60]}" in text
    # The default shows both reduction modes, merged in each evaluation.
    assert "rank 0: records reduced on the client; rank 1: logits reduced on the server" in text
