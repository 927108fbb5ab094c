"""Every ranking metric as a statistic of per-sample weights, for the bootstrap.

A bootstrap replicate is a weight per sample (see weights.py); with all weights
equal to one each statistic here equals the engine's metric on the same records
(tests check this against ``compute_metrics``). Statistics take a block of
replicates at once, ``w`` of shape [b, n], and return [b] values:

- means (nll, brier, top-k accuracy) are one matrix product ``w @ x``;
- ratios of means (nll on right / wrong samples) are two;
- binned and per-class metrics (ECE, RMS, MCE, adaptive ECE, balanced accuracy,
  macro precision / F1, head / torso / tail accuracy, prediction shift) are
  weighted bincounts over [b, bins or classes] with the bin or class of every
  sample fixed by the full sample (for adaptive ECE the equal-mass bins and for
  the buckets the class ranking are those of the full sample);
- the calibrated NLL is the weighted mean NLL over temperatures followed by a
  parabola through the minimum in log T, vectorised over replicates: for records
  with the engine's temperature model (docs/metrics.md) at 17 temperatures around
  the engine's exact T* (so unit weights give the engine's value), for legacy
  records at the grid points (the engine's parabola);
- NLL percentiles are weighted quantiles (lower inverted CDF).

Columns are centred on their full-sample mean before the float32 matrix
product, so float32 accumulation over a million samples loses nothing that
matters for a difference between models.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import numpy.typing as npt

from evalstream.service.engine.calibration import equal_width_bins
from evalstream.service.engine.config import EngineConfig
from evalstream.service.engine.curve import Curve
from evalstream.service.engine.records import Records
from evalstream.service.engine.registry import accuracy_name
from evalstream.service.engine.temperature import scan_records

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]
IDX = npt.NDArray[np.intp]


class Statistic(ABC):
    """A metric as a function of sample weights."""

    @abstractmethod
    def evaluate(self, w: F32) -> F64:
        """Values for each row of ``w`` ([b, n] weights)."""

    def point(self, n: int) -> float:
        """The metric itself (all weights one)."""
        return float(self.evaluate(np.ones((1, n), dtype=np.float32))[0])


class Columns:
    """[n, F] per-sample columns prepared once for weighted means over many weight blocks.

    Centred on their full-sample mean and stored as float32 with a trailing
    column of ones, so one matrix product gives the weighted sums and the total
    weight (integer-valued, exact in float32 below 2**24; larger n sums the
    weights in float64 instead)."""

    EXACT_TOTAL = 1 << 23

    def __init__(self, columns: F64) -> None:
        n, f = columns.shape
        self.width = f
        self.centre = columns.mean(axis=0) if n else np.zeros(f)
        # Stored transposed ([F + 1, n], C order): (rows @ w.T) runs markedly faster in BLAS
        # than w @ columns for a few long columns (measured in bench/bootstrap.py).
        self.rows = np.empty((f + 1, n), dtype=np.float32)
        self.rows[:f] = (columns - self.centre).T
        self.rows[f] = 1.0
        self.exact_total = n < self.EXACT_TOTAL

    def means(self, w: F32) -> F64:
        """[b, F] weighted means."""
        sums = (self.rows @ w.T).T.astype(np.float64)
        total = sums[:, self.width] if self.exact_total else w.sum(axis=1, dtype=np.float64)
        return self.centre[None, :] + sums[:, : self.width] / np.maximum(total, 1e-300)[:, None]


def segment_sums(w: F32, values: F64 | None, segment: IDX, k: int) -> F64:
    """[b, k] sums of w * values over samples grouped by ``segment`` (values None: of w)."""
    b = w.shape[0]
    offsets = (segment[None, :] + k * np.arange(b, dtype=np.intp)[:, None]).ravel()
    weights = (w if values is None else w * values[None, :].astype(np.float32)).ravel()
    sums: F64 = np.bincount(offsets, weights=weights, minlength=b * k).astype(np.float64)
    return sums.reshape(b, k)


class Mean(Statistic):
    """Mean of a per-sample quantity; also the paired difference of two such means."""

    def __init__(self, x: F64) -> None:
        self.x = np.asarray(x, dtype=np.float64)
        self.columns = Columns(self.x[:, None])

    def evaluate(self, w: F32) -> F64:
        return self.columns.means(w)[:, 0]

    def point(self, n: int) -> float:
        return float(self.x.mean()) if n else 0.0


class MaskedMean(Statistic):
    """Mean of x over the samples in ``mask`` (NLL of right or of wrong samples); a float mask
    weighs each sample (a top-1 credit between 0 and 1 where the label tied another class)."""

    def __init__(self, x: F64, mask: npt.NDArray[np.bool_] | F64) -> None:
        m = mask.astype(np.float64)
        self.columns = Columns(np.stack([x * m, m], axis=1))

    def evaluate(self, w: F32) -> F64:
        means = self.columns.means(w)
        return np.divide(means[:, 0], means[:, 1], out=np.zeros(len(means)), where=means[:, 1] > 0)


class BinnedCalibration(Statistic):
    """ECE / RMS / MCE over fixed bins from per-bin weighted sums of the gap (conf - correct) and,
    for RMS / MCE, of the bin's weight: one matrix product with one-hot bin columns (15 bins:
    16 or 31 float32 columns, far faster than a scatter per replicate)."""

    def __init__(self, kind: str, bins: IDX, confidence: F64, correct: F64, num_bins: int):
        self.kind, self.num_bins = kind, num_bins
        onehot = np.zeros((len(bins), num_bins))
        onehot[np.arange(len(bins)), bins] = 1.0
        gap = (confidence - correct.astype(np.float64))[:, None] * onehot
        self.columns = Columns(gap if kind == "ece" else np.concatenate([gap, onehot], axis=1))

    def evaluate(self, w: F32) -> F64:
        means = self.columns.means(w)
        gap = means[:, : self.num_bins]
        if self.kind == "ece":
            return np.abs(gap).sum(axis=1)
        share = means[:, self.num_bins :]
        nonempty = share > 1e-12
        mean_gap = np.divide(gap, share, out=np.zeros_like(gap), where=nonempty)
        if self.kind == "rms_ce":
            return np.sqrt((share * mean_gap**2).sum(axis=1))
        return np.abs(mean_gap).max(axis=1)  # mce: empty bins contribute 0


def equal_mass_bins(confidence: F64, correct: F64, num_bins: int) -> IDX:
    """Each sample's equal-mass bin as the engine forms them (sorted by confidence, then correct)."""
    n = len(confidence)
    order = np.lexsort((correct, confidence))
    sizes = [len(part) for part in np.array_split(np.arange(n), num_bins)]
    bins = np.empty(n, dtype=np.intp)
    bins[order] = np.repeat(np.arange(num_bins), sizes)
    return bins


class ClassMetric(Statistic):
    """balanced_accuracy, macro_precision, macro_f1, prediction_shift_tv from weighted class counts.

    Recall (balanced accuracy) counts each sample's top-1 credit; precision and F1 need one
    predicted class and count the binary view, argmax == label (as the engine's imbalance.py)."""

    def __init__(self, kind: str, label: IDX, pred: IDX, credit: F64, num_classes: int):
        self.kind, self.label, self.pred, self.c = kind, label, pred, num_classes
        self.correct = credit if kind == "balanced_accuracy" else (pred == label).astype(np.float64)

    def evaluate(self, w: F32) -> F64:
        support = segment_sums(w, None, self.label, self.c)
        predicted = segment_sums(w, None, self.pred, self.c)
        if self.kind == "prediction_shift_tv":
            return 0.5 * np.abs(support - predicted).sum(axis=1) / np.maximum(support.sum(axis=1), 1e-300)
        right = segment_sums(w, self.correct, self.label, self.c)
        present = support > 0
        if self.kind == "balanced_accuracy":
            recall = np.divide(right, support, out=np.zeros_like(right), where=present)
            return recall.sum(axis=1) / np.maximum(present.sum(axis=1), 1)
        seen = present | (predicted > 0)
        if self.kind == "macro_precision":
            per_class = np.divide(right, predicted, out=np.zeros_like(right), where=predicted > 0)
        else:
            denom = support + predicted
            per_class = np.divide(2.0 * right, denom, out=np.zeros_like(right), where=denom > 0)
        return np.where(seen, per_class, 0.0).sum(axis=1) / np.maximum(seen.sum(axis=1), 1)


def class_buckets(label: IDX, num_classes: int) -> IDX:
    """Bucket (0 head, 1 torso, 2 tail) of every class, by the engine's rule on the full sample."""
    support = np.bincount(label, minlength=num_classes).astype(np.int64)
    n = int(support.sum())
    present = np.flatnonzero(support > 0)
    order = present[np.lexsort((present, -support[present]))]
    before = np.concatenate([[0], np.cumsum(support[order])[:-1]]) if len(order) else np.zeros(0, np.int64)
    which = np.full(num_classes, 2, dtype=np.intp)
    which[order] = (3 * before) // max(n, 1)
    return which


class BucketAccuracy(Statistic):
    """Top-1 accuracy on the head, torso or tail classes (classes fixed by the full sample)."""

    def __init__(self, bucket: int, label: IDX, credit: F64, num_classes: int):
        in_bucket = class_buckets(label, num_classes)[label] == bucket
        self.inner = MaskedMean(credit, in_bucket)

    def evaluate(self, w: F32) -> F64:
        return self.inner.evaluate(w)


def parabola_vertex(x: F64, f: F64) -> tuple[F64, F64]:
    """Vectorised engine ``parabola_min``: x, f are [b, 3]; returns (x*, f*) (NaN where flat)."""
    x0, x1, x2 = x[:, 0], x[:, 1], x[:, 2]
    f0, f1, f2 = f[:, 0], f[:, 1], f[:, 2]
    num = (x1 - x0) ** 2 * (f1 - f2) - (x1 - x2) ** 2 * (f1 - f0)
    den = (x1 - x0) * (f1 - f2) - (x1 - x2) * (f1 - f0)
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x1 - 0.5 * num / den
        fs = (
            f0 * (xs - x1) * (xs - x2) / ((x0 - x1) * (x0 - x2))
            + f1 * (xs - x0) * (xs - x2) / ((x1 - x0) * (x1 - x2))
            + f2 * (xs - x0) * (xs - x1) / ((x2 - x0) * (x2 - x1))
        )
    flat = den == 0.0
    return np.where(flat, np.nan, xs), np.where(flat, np.nan, fs)


def temperature_optimum(means: F64, temperatures: F64) -> tuple[F64, F64]:
    """(T*, NLL at T*) per row of [b, G] mean NLL over increasing temperatures, as the engine's scan."""
    b, g = means.shape
    rows = np.arange(b)
    j = np.argmin(means, axis=1)
    best_t, best = temperatures[j].astype(np.float64), means[rows, j]
    inner = (j > 0) & (j < g - 1)
    if inner.any():
        jj = np.clip(j, 1, g - 2)
        cols = np.stack([jj - 1, jj, jj + 1], axis=1)
        logt = np.log(temperatures)[cols]
        xs, fs = parabola_vertex(logt, means[rows[:, None], cols])
        use = inner & ~np.isnan(xs)
        best_t = np.where(use, np.exp(np.where(use, xs, 0.0)), best_t)
        best = np.where(use, fs, best)
    return best_t, best


class CalibratedNll(Statistic):
    """NLL at the best temperature: weighted grid means, then the parabola through the minimum."""

    # Temperatures around the engine's T* for records with the temperature model: T* times
    # exp(+-0.05 k), k <= 8, inside the grid (a replicate's T* moves little from the full sample's).
    LOCAL = np.linspace(-0.4, 0.4, 17)

    def __init__(self, nll_t: F32 | F64, inverse_temperatures: F64):
        # Columns in increasing T, as the engine's scan orders them.
        self.columns = Columns(nll_t[:, ::-1].astype(np.float64))
        self.temperatures = 1.0 / np.asarray(inverse_temperatures, dtype=np.float64)[::-1]

    @classmethod
    def of(cls, records: Records) -> CalibratedNll:
        """Legacy records: the grid columns. Otherwise the model at 17 points around the exact T*."""
        if records.legacy or len(records) == 0:
            return cls(records.nll_t, records.inverse_temperatures)
        grid = np.asarray(records.inverse_temperatures, dtype=np.float64)
        model = Curve(records)
        b_star = 1.0 / scan_records(records, model).best_temperature
        local = np.unique(np.clip(b_star * np.exp(cls.LOCAL), grid[0], grid[-1]))
        columns = np.stack([model.sample(float(b)) for b in local], axis=1)
        return cls(columns, local)

    def evaluate(self, w: F32) -> F64:
        return temperature_optimum(self.columns.means(w), self.temperatures)[1]


class WeightedQuantile(Statistic):
    """q-quantile of per-sample NLL under the weights (lower inverted CDF)."""

    def __init__(self, x: F64, q: float):
        self.order = np.argsort(x, kind="stable")
        self.sorted = x[self.order]
        self.q = q

    def evaluate(self, w: F32) -> F64:
        cum = np.cumsum(w[:, self.order], axis=1, dtype=np.float64)
        out = np.empty(len(w))
        for r in range(len(w)):
            target = self.q * cum[r, -1]
            out[r] = self.sorted[min(int(np.searchsorted(cum[r], target, side="left")), len(self.sorted) - 1)]
        return out


def statistic_for(name: str, records: Records, num_classes: int, config: EngineConfig) -> Statistic | None:
    """The weighted form of a ranking metric on these records; None for a name it does not know."""
    # Accuracy-like statistics count each sample's top-1 credit (expected correctness under
    # random tie-breaking, docs/metrics.md "Ties"), exactly as compute_metrics does.
    correct = records.topk_credit(1)
    nll = records.nll.astype(np.float64)
    conf = records.confidence.astype(np.float64)
    label = records.label.astype(np.intp)
    pred = records.pred.astype(np.intp)
    for k in config.top_k:
        if name == accuracy_name(k):
            return Mean(records.topk_credit(k))
    if name in ("nll", "brier"):
        return Mean(nll if name == "nll" else records.brier.astype(np.float64))
    if name in ("nll_correct", "nll_wrong"):
        return MaskedMean(nll, correct if name == "nll_correct" else 1.0 - correct)
    if name in ("ece", "rms_ce", "mce"):
        return BinnedCalibration(
            name, equal_width_bins(conf, config.num_bins), conf, correct, config.num_bins
        )
    if name == "adaptive_ece":
        bins = equal_mass_bins(conf, correct, config.num_bins)
        return BinnedCalibration("ece", bins, conf, correct, config.num_bins)
    if name in ("balanced_accuracy", "macro_precision", "macro_f1", "prediction_shift_tv"):
        return ClassMetric(name, label, pred, correct, num_classes)
    buckets = {"accuracy_head": 0, "accuracy_torso": 1, "accuracy_tail": 2}
    if name in buckets:
        return BucketAccuracy(buckets[name], label, correct, num_classes)
    if name == "calibrated_nll":
        return CalibratedNll.of(records)
    quantiles = {"nll_p50": 0.5, "nll_p90": 0.9, "nll_p99": 0.99}
    if name in quantiles:
        return WeightedQuantile(nll, quantiles[name])
    return None


def paired_difference(a: Statistic, b: Statistic) -> Mean | None:
    """A single statistic for a - b when both are plain means (more precise, one product)."""
    if isinstance(a, Mean) and isinstance(b, Mean):
        return Mean(a.x - b.x)
    return None


__all__ = ["Statistic", "paired_difference", "statistic_for"]
