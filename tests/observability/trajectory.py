"""Two models over training steps whose loss and accuracy disagree: the case the dashboard is for.

The baseline is sharp (confident, and confidently wrong on its errors): its accuracy climbs, its
loss barely moves. The candidate starts overconfident (logits scaled up, a temperature problem)
and learns to hedge, keeping probability on the true class when it is wrong: its loss falls
below the baseline's by the middle of training while its top-1 accuracy stays lower at every
step. Both are ``client/synthetic.py`` variants on one fixed validation set (same labels at
every step, as in training), so the metrics come from the engine, not from this file.
"""

from __future__ import annotations

from evalstream.client.synthetic import SyntheticValidationSet, Variant
from tests.observability.streaming import Data

CLASSES = 3000
SAMPLES = 1500
SEED = 7
STEPS = (100, 200, 300, 400, 500, 600)
MODELS = ("baseline", "candidate")


def variants(progress: float) -> tuple[Variant, Variant]:
    """The two models at ``progress`` in [0, 1] of training."""
    t = progress
    baseline = Variant(
        "baseline",
        "sharp: accuracy climbs, loss stays high (confidently wrong on its errors)",
        confidence=(6.0 + 6.0 * t, 2.5),
        accuracy_shift=-0.16,
        true_share=(0.4, 30.0),
        buried=0.6,
    )
    candidate = Variant(
        "candidate",
        "starts overconfident, learns to hedge: loss falls below the baseline's, accuracy stays lower",
        confidence=(2.5 + 1.8 * t, 5.0),
        accuracy_shift=0.10,
        true_share=(1.0 + 2.0 * t, 3.0),
        buried=0.6 - 0.35 * t,
        scale=2.6 - 1.6 * t,
    )
    return baseline, candidate


def step_data(index: int) -> dict[str, Data]:
    """Logits and labels of both models at ``STEPS[index]``, on the same validation samples."""
    progress = index / (len(STEPS) - 1)
    dataset = SyntheticValidationSet(SAMPLES, CLASSES, seed=SEED, variants=variants(progress))
    out = {}
    for model in MODELS:
        scores, labels, _ = dataset.batch(model, 0, SAMPLES)
        out[model] = Data(scores, labels)
    return out
