"""The dashboard picture's data really shows the disagreement it is drawn to show.

Loss and accuracy are computed here independently of the engine (float64 numpy on the logits), so
the check is on the synthetic data itself; the end-to-end test shows the engine reports the same.
"""

from __future__ import annotations

from tests.observability.trajectory import STEPS, step_data


def test_candidate_loss_falls_below_the_baseline_while_its_accuracy_stays_lower() -> None:
    nll: dict[str, list[float]] = {"baseline": [], "candidate": []}
    acc: dict[str, list[float]] = {"baseline": [], "candidate": []}
    for i in range(len(STEPS)):
        for model, data in step_data(i).items():
            nll[model].append(data.nll)
            acc[model].append(data.accuracy)
    # The losses cross once: the candidate starts above the baseline and ends well below it.
    above = [c > b for c, b in zip(nll["candidate"], nll["baseline"], strict=True)]
    assert above[0] and not above[-1]
    assert above == sorted(above, reverse=True), above
    assert nll["candidate"][-1] < 0.75 * nll["baseline"][-1]
    # Accuracy ranks them the other way at every step, by a visible margin.
    assert all(b - c > 0.02 for c, b in zip(acc["candidate"], acc["baseline"], strict=True)), acc
    # Both train: accuracy and loss improve from the first step to the last.
    for model in nll:
        assert acc[model][-1] > acc[model][0] and nll[model][-1] < nll[model][0]
