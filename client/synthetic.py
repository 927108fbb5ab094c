"""A seeded synthetic validation set whose models disagree the way real ones do.

Labels follow a Zipf law over many classes. Each model variant is described
by how confident its top-1 prediction is, how often that prediction is right
at a given confidence, and — when it is wrong — how much probability it still
leaves on the true class. Logits are built so the softmax has exactly that
top-1 confidence and true-class share, over a Gaussian background, then
scaled by the variant's inverse temperature. Nothing is computed here but
the logits: the metrics come from the evaluation engine.

Variants share a per-sample difficulty (a Gaussian copula), so the same
samples tend to be hard for every model and a paired comparison is meaningful.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]
F64 = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Variant:
    """How one synthetic model behaves.

    ``confidence``: Beta(a, b) of the top-1 confidence before scaling.
    ``accuracy_shift``: P(correct | confidence) = confidence + shift (positive:
    underconfident, negative: overconfident; 0: calibrated).
    ``true_share``: Beta(a, b) of the share of the remaining probability the
    true class gets when the prediction is wrong (high: hedging, low:
    confidently wrong); with probability ``buried`` the true class gets no
    extra share at all and sits among the background classes (what keeps
    top-5 accuracy below 1). ``scale``: logits are multiplied by it (> 1 makes
    an otherwise calibrated model overconfident by a temperature).
    """

    name: str
    description: str
    confidence: tuple[float, float]
    accuracy_shift: float
    true_share: tuple[float, float]
    buried: float
    scale: float = 1.0
    noise: float = 1.0


# The motivating situation: ranking by loss and by accuracy disagree.
VARIANTS: tuple[Variant, ...] = (
    Variant(
        "smooth",
        "hedges: lower loss, lower accuracy (underconfident, keeps mass on the true class)",
        confidence=(4.0, 5.0),
        accuracy_shift=0.12,
        true_share=(3.0, 3.0),
        buried=0.25,
    ),
    Variant(
        "sharp",
        "higher accuracy, higher loss (confidently wrong on its errors)",
        confidence=(12.0, 1.5),
        accuracy_shift=-0.16,
        true_share=(0.4, 30.0),
        buried=0.6,
    ),
    Variant(
        "overconfident",
        "a good model (the most accurate, hedging on its errors) with its logits scaled up 3x: "
        "over-confident, so its loss is high until temperature scaling undoes the scale",
        confidence=(9.0, 3.0),
        accuracy_shift=0.0,
        true_share=(3.0, 3.0),
        buried=0.15,
        scale=3.0,
    ),
)

_COPULA_RHO = 0.8
_CONF_RANGE = (0.02, 0.995)


def zipf_probabilities(num_classes: int, exponent: float) -> F64:
    """P(class c) proportional to 1 / (c + 1)^exponent: class 0 is the most frequent."""
    w = 1.0 / np.arange(1, num_classes + 1, dtype=np.float64) ** exponent
    return w / w.sum()


def _ndtr(x: F64) -> F64:
    """Standard normal CDF (numpy has no erf)."""
    erf = np.fromiter((math.erf(v) for v in (x / math.sqrt(2.0)).tolist()), dtype=np.float64, count=x.size)
    return 0.5 * (1.0 + erf)


@dataclass
class _Plan:
    """Per-sample choices of one variant: small vectors, the [n, C] logits come per batch."""

    target: I64  # predicted (top-1) class
    wrong: npt.NDArray[np.bool_]
    boosted: npt.NDArray[np.bool_]  # wrong, and the true class keeps `true_share` of the rest
    confidence: F64
    true_share: F64


class SyntheticValidationSet:
    """``num_samples`` Zipf-distributed labels over ``num_classes`` and per-variant logits.

    Deterministic for a seed, and independent of how it is split into ranks
    and batches: batch ``b`` is samples [b * batch_size, (b + 1) * batch_size).
    """

    def __init__(
        self,
        num_samples: int = 24_000,
        num_classes: int = 3_000,
        seed: int = 0,
        zipf_exponent: float = 1.0,
        variants: tuple[Variant, ...] = VARIANTS,
    ) -> None:
        if num_samples < 1 or num_classes < 2:
            raise ValueError("need at least one sample and two classes")
        self.num_samples = num_samples
        self.num_classes = num_classes
        self.seed = seed
        self.variants = {v.name: v for v in variants}
        rng = np.random.default_rng([seed, 0])
        self.class_probabilities = zipf_probabilities(num_classes, zipf_exponent)
        self.labels: I64 = rng.choice(num_classes, size=num_samples, p=self.class_probabilities).astype(
            np.int64
        )
        # Shared latents: how hard each sample is, and how likely any model gets it right.
        self._difficulty = rng.standard_normal(num_samples)
        self._luck = rng.standard_normal(num_samples)
        # A plausible wrong answer per sample, drawn from the label distribution (majority bias).
        self._confuser = self._draw_confusers(rng)
        logp = np.log(self.class_probabilities)
        # 1 for the most frequent class, 0 for the rarest: rare classes get lower confidence.
        self._headness = (logp[self.labels] - logp.min()) / max(1e-12, logp.max() - logp.min())
        self._plans = {name: self._plan(i + 1, v) for i, (name, v) in enumerate(self.variants.items())}

    def _draw_confusers(self, rng: np.random.Generator) -> I64:
        c = rng.choice(self.num_classes, size=self.num_samples, p=self.class_probabilities).astype(np.int64)
        same = c == self.labels
        c[same] = (
            c[same] + 1 + rng.integers(0, self.num_classes - 1, size=int(same.sum()))
        ) % self.num_classes
        return c

    def _plan(self, index: int, v: Variant) -> _Plan:
        rng = np.random.default_rng([self.seed, index])
        n = self.num_samples
        rho, rest = _COPULA_RHO, np.sqrt(1 - _COPULA_RHO**2)
        # Confidence: the variant's Beta marginal, assigned by (noisy) shared easiness.
        draws = np.sort(rng.beta(*v.confidence, size=n))
        easiness = -(rho * self._difficulty + rest * rng.standard_normal(n))
        confidence = np.empty(n)
        confidence[np.argsort(easiness)] = draws
        confidence *= 0.7 + 0.3 * self._headness
        confidence = np.clip(confidence, *_CONF_RANGE)
        # Correct with probability confidence + shift, through a shared uniform.
        u = _ndtr(rho * self._luck + rest * rng.standard_normal(n))
        wrong = u >= np.clip(confidence + v.accuracy_shift, 0.0, 1.0)
        # Half of the wrong answers are the shared confuser, half the variant's own.
        own = self._draw_confusers(rng)
        confuser = np.where(rng.random(n) < 0.5, self._confuser, own)
        target = np.where(wrong, confuser, self.labels)
        # The true class must stay below the top-1 class, else the sample would be right after all.
        share = np.minimum(rng.beta(*v.true_share, size=n), 0.9 * confidence / (1 - confidence))
        share = np.clip(share, 1e-6, 1 - 1e-6)
        boosted = wrong & (rng.random(n) >= v.buried)
        return _Plan(target=target, wrong=wrong, boosted=boosted, confidence=confidence, true_share=share)

    def num_batches(self, batch_size: int) -> int:
        return -(-self.num_samples // batch_size)

    def batch(self, variant: str, index: int, batch_size: int) -> tuple[F32, I64, I64]:
        """(logits [b, C] float32, labels [b], sample ids [b]) of batch ``index``."""
        v, plan = self.variants[variant], self._plans[variant]
        lo, hi = index * batch_size, min(self.num_samples, (index + 1) * batch_size)
        if lo >= hi:
            raise IndexError(f"batch {index} is past the end ({self.num_samples} samples)")
        rows = np.arange(hi - lo)
        vi = list(self.variants).index(variant) + 1
        rng = np.random.default_rng([self.seed, vi, 1_000_000 + index])
        z = rng.standard_normal((hi - lo, self.num_classes), dtype=np.float32)
        z *= np.float32(v.noise)
        target, labels = plan.target[lo:hi], self.labels[lo:hi]
        boost = plan.boosted[lo:hi]
        conf, share = plan.confidence[lo:hi], plan.true_share[lo:hi]
        z[rows, target] = -np.inf
        z[rows[boost], labels[boost]] = -np.inf
        rest = _logsumexp_rows(z)
        # Boosted rows: the true class takes `share` of the mass left by the top-1 class.
        z[rows[boost], labels[boost]] = (rest[boost] + np.log(share[boost] / (1 - share[boost]))).astype(
            np.float32
        )
        others = np.where(boost, rest - np.log1p(-share), rest)
        z[rows, target] = (others + np.log(conf / (1 - conf))).astype(np.float32)
        if v.scale != 1.0:
            z *= np.float32(v.scale)
        return z, labels.copy(), np.arange(lo, hi, dtype=np.int64)

    def batches(
        self, variant: str, batch_size: int, rank: int = 0, world_size: int = 1
    ) -> Iterator[tuple[F32, I64, I64]]:
        """This rank's batches (every ``world_size``-th, like a distributed sampler)."""
        for index in range(rank, self.num_batches(batch_size), world_size):
            yield self.batch(variant, index, batch_size)

    def rank_samples(self, batch_size: int, rank: int, world_size: int) -> int:
        """How many samples ``batches(..., rank, world_size)`` yields."""
        return sum(
            min(self.num_samples, (i + 1) * batch_size) - i * batch_size
            for i in range(rank, self.num_batches(batch_size), world_size)
        )


def _logsumexp_rows(z: F32) -> F64:
    m = z.max(axis=1, keepdims=True)
    return (np.log(np.exp(z - m).sum(axis=1, dtype=np.float64)) + m[:, 0]).astype(np.float64)
