"""Candidates with known properties, built through the real engine (ChunkReducer + compute_metrics)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from evalstream.service.compare import CandidateInput
from evalstream.service.engine.config import EngineConfig
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.records import Records
from evalstream.service.engine.reducer import ChunkReducer

CONFIG = EngineConfig(top_k=(1, 5), device="cpu")


def zipf_prior(num_classes: int, exponent: float = 1.1) -> npt.NDArray[np.float64]:
    """Imbalanced class frequencies: p_c proportional to (c + 1) ** -exponent."""
    p = (np.arange(num_classes) + 1.0) ** -exponent
    return p / p.sum()


def sample_labels(logits: npt.NDArray[np.float64], rng: np.random.Generator) -> npt.NDArray[np.int64]:
    """Labels drawn from softmax(logits): a model whose logits are these is calibrated at T = 1."""
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    u = rng.random((len(p), 1))
    return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), p.shape[1] - 1)


def world(
    n: int, num_classes: int, seed: int, sharpness: float = 3.0
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """True logits (Gaussian scores plus the log class prior) and labels drawn from them."""
    rng = np.random.default_rng(seed)
    logits = sharpness * rng.standard_normal((n, num_classes)) + np.log(zipf_prior(num_classes))[None, :]
    return logits, sample_labels(logits, rng)


def records_of(
    logits: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    ids: npt.NDArray[np.int64] | None = None,
    config: EngineConfig = CONFIG,
) -> Records:
    reducer = ChunkReducer(logits.shape[1], config)
    return reducer.reduce(logits.astype(np.float32), labels.astype(np.int64), ids)


def candidate(
    model: str,
    logits: npt.NDArray[np.float64],
    labels: npt.NDArray[np.int64],
    ids: npt.NDArray[np.int64] | None = None,
    *,
    run: str = "run",
    split: str = "validation",
    step: int = 100,
    keep_records: bool = True,
    config: EngineConfig = CONFIG,
) -> CandidateInput:
    """A stored evaluation: metrics from compute_metrics, records kept or dropped."""
    rec = records_of(logits, labels, ids, config)
    metrics = compute_metrics(rec, logits.shape[1], config).scalars()
    return CandidateInput(
        run=run,
        model=model,
        split=split,
        step=step,
        evaluation_id=f"{run}/{model}/{split}/{step}",
        num_classes=logits.shape[1],
        metrics=metrics,
        records=rec if keep_records else None,
    )
