"""Putting candidates on the same samples before they are compared.

When every candidate that still has records carries sample ids, each is
restricted to the ids all of them share, in id order, so row i is the same
sample for every candidate (paired comparison); metrics are recomputed on that
subset by the engine whenever it is smaller than what was stored. Otherwise the
candidates' own samples are used as they are (unpaired comparison).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

from evalstream.service.compare.inputs import CandidateInput, CompareError
from evalstream.service.engine.config import EngineConfig
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.records import Records


@dataclass
class Aligned:
    """Records and metrics per candidate, on common samples where ``paired``.

    ``records[i]`` is None for a candidate without records; ``samples_used[i]``
    is 0 then (its stored metrics are used as they are)."""

    records: list[Records | None]
    metrics: list[dict[str, float]]
    samples_used: list[int]
    paired: bool
    common_samples: int


def config_for(records: Records, config: EngineConfig) -> EngineConfig:
    """The engine config with the records' own temperature grid (records fix the grid)."""
    grid = tuple(float(a) for a in records.inverse_temperatures)
    return (
        config
        if grid == tuple(config.inverse_temperatures)
        else dataclasses.replace(config, inverse_temperatures=grid)
    )


def align(candidates: Sequence[CandidateInput], config: EngineConfig) -> Aligned:
    """Restrict candidates to their common sample ids when all records have ids."""
    kept = [None if c.records is None or len(c.records) == 0 else c.records.dedupe()[0] for c in candidates]
    present = [r for r in kept if r is not None]
    metrics = [dict(c.metrics) for c in candidates]
    if len(present) < 2 or not all(r.has_sample_ids for r in present):
        used = [0 if r is None else len(r) for r in kept]
        return Aligned(kept, metrics, used, paired=False, common_samples=0)
    common = reduce(np.intersect1d, [r.sample_id for r in present])
    if len(common) == 0:
        raise CompareError(
            "FAILED_PRECONDITION",
            "the candidates share no sample ids, so they were evaluated on different samples; "
            "compare evaluations of the same split with the same sample ids",
        )
    aligned: list[Records | None] = []
    for i, (cand, rec) in enumerate(zip(candidates, kept, strict=True)):
        if rec is None:
            aligned.append(None)
            continue
        sub = rec if len(rec) == len(common) else rec.take(np.isin(rec.sample_id, common, assume_unique=True))
        if len(sub) != len(rec):
            report = compute_metrics(sub, cand.num_classes, config_for(sub, config), dedupe=False)
            metrics[i] = report.scalars()
        aligned.append(sub)
    used = [0 if r is None else len(common) for r in aligned]
    return Aligned(aligned, metrics, used, paired=True, common_samples=len(common))
