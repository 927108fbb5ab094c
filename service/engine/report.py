"""The computed metrics of one evaluation, as plain dataclasses.

Mirrors ``evalstream.v1.EvaluationResult`` field for field, so the servicer's
conversion is mechanical and the engine stays free of protobuf.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from evalstream.service.engine.registry import accuracy_name


@dataclass
class LossSummary:
    mean: float
    p50: float
    p90: float
    p99: float
    mean_correct: float
    mean_wrong: float
    share_correct: float
    share_wrong: float


@dataclass
class ReliabilityBin:
    lower: float
    upper: float
    count: int
    mean_confidence: float
    accuracy: float


@dataclass
class Calibration:
    num_bins: int
    ece: float
    rms_ce: float
    mce: float
    adaptive_ece: float
    mean_confidence: float
    overconfidence: float
    bins: list[ReliabilityBin]
    bin_edges: str = "(lo, hi]"


@dataclass
class ClassBucket:
    name: str
    num_classes: int
    num_samples: int
    accuracy: float


@dataclass
class ConfusedPair:
    label: int
    prediction: int
    count: int


@dataclass
class PerClass:
    """Per-class counts. ``correct``: samples of the class whose argmax is the class (the binary
    view, precision's numerator); ``credited``: the class's summed top-1 credit (recall's
    numerator; equals ``correct`` on tie-free data)."""

    support: npt.NDArray[np.int64]
    correct: npt.NDArray[np.int64]
    predicted: npt.NDArray[np.int64]
    credited: npt.NDArray[np.float64]


@dataclass
class Imbalance:
    balanced_accuracy: float
    macro_precision: float
    macro_f1: float
    buckets: list[ClassBucket]
    prediction_shift_tv: float
    top_confusions: list[ConfusedPair]
    classes_present: int
    per_class: PerClass


@dataclass
class TemperatureScan:
    temperatures: list[float]
    nll: list[float]
    best_temperature: float
    calibrated_nll: float
    # 0: T* lies within the grid. +1: the optimum is beyond the grid's highest temperature
    # (T* > best_temperature, which is that end); -1: beyond its lowest (T* < best_temperature).
    beyond_grid: int = 0


@dataclass
class MetricReport:
    num_samples: int
    num_classes: int
    duplicates_dropped: int
    loss: LossSummary
    top_k: dict[int, float]
    calibration: Calibration
    brier: float
    entropy: float
    imbalance: Imbalance
    temperature: TemperatureScan
    # Share of samples whose label's score equals another class's exactly (see metrics.py).
    label_tie_share: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    def scalars(self) -> dict[str, float]:
        """Every headline metric by its canonical name (see registry.py)."""
        cal, imb, loss = self.calibration, self.imbalance, self.loss
        out = {
            "nll": loss.mean,
            "nll_p50": loss.p50,
            "nll_p90": loss.p90,
            "nll_p99": loss.p99,
            "nll_correct": loss.mean_correct,
            "nll_wrong": loss.mean_wrong,
            "loss_share_wrong": loss.share_wrong,
            "ece": cal.ece,
            "rms_ce": cal.rms_ce,
            "mce": cal.mce,
            "adaptive_ece": cal.adaptive_ece,
            "mean_confidence": cal.mean_confidence,
            "overconfidence": cal.overconfidence,
            "brier": self.brier,
            "entropy": self.entropy,
            "balanced_accuracy": imb.balanced_accuracy,
            "macro_precision": imb.macro_precision,
            "macro_f1": imb.macro_f1,
            "prediction_shift_tv": imb.prediction_shift_tv,
            "best_temperature": self.temperature.best_temperature,
            "calibrated_nll": self.temperature.calibrated_nll,
            "temperature_beyond_grid": float(self.temperature.beyond_grid),
            "label_tie_share": self.label_tie_share,
        }
        out.update({f"accuracy_{b.name}": b.accuracy for b in imb.buckets})
        out.update({accuracy_name(k): v for k, v in self.top_k.items()})
        out.update(self.extra)
        return out

    def to_dict(self, per_class: bool = False) -> dict[str, Any]:
        """JSON-ready form (the CLI's --json and the tests)."""
        d = asdict(self)
        pc = d["imbalance"].pop("per_class")
        if per_class:
            d["imbalance"]["per_class"] = {k: np.asarray(v).tolist() for k, v in pc.items()}
        d["top_k"] = {str(k): v for k, v in self.top_k.items()}
        d["metrics"] = self.scalars()
        return d
