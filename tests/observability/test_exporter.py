"""QualityCollector: values, naming, the series bound and promtool's lint, without a server."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from evalstream.service.exporter import QualityCollector
from evalstream.service.status import FinalizedView, SeriesKey, ShardProgress
from evalstream.service.telemetry import Telemetry
from tests.observability.promtools import promtool
from tests.observability.sources import MemoryFinalized, MemoryProgress, make_result

KEY = SeriesKey("run-a", "resnet", "validation")


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Parse the exposition the way Prometheus would and index it by (name, labels)."""
    text = generate_latest(registry).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def key_labels(key: SeriesKey, **extra: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted({"run": key.run, "model": key.model, "split": key.split, **extra}.items()))


def registry_with(
    finalized: MemoryFinalized, progress: MemoryProgress, max_series: int = 1000
) -> CollectorRegistry:
    telemetry = Telemetry()
    telemetry.registry.register(
        QualityCollector(finalized=finalized, progress=progress, max_series=max_series)
    )
    return telemetry.registry


def test_finalized_gauges_carry_the_result() -> None:
    finalized = MemoryFinalized()
    finalized.put(FinalizedView(KEY, step=300, finalized_at=1000.0, result=make_result(nll=2.5, top1=0.4)))
    got = samples(registry_with(finalized, MemoryProgress()))
    lab = key_labels(KEY)
    assert got[("evalstream_eval_step", lab)] == 300
    assert got[("evalstream_eval_samples", lab)] == 1000
    assert got[("evalstream_eval_classes", lab)] == 3000
    assert got[("evalstream_eval_nll", lab)] == 2.5
    assert got[("evalstream_eval_accuracy_top1_ratio", lab)] == 0.4
    assert got[("evalstream_eval_accuracy_top5_ratio", lab)] == pytest.approx(0.6)
    assert got[("evalstream_eval_ece_ratio", lab)] == 0.05
    assert got[("evalstream_eval_brier", lab)] == 0.55  # not a fraction: no _ratio
    assert got[("evalstream_eval_best_temperature", lab)] == 1.4
    assert got[("evalstream_eval_accuracy_tail_ratio", lab)] == 0.2
    assert got[("evalstream_eval_finalized_timestamp_seconds", lab)] == 1000.0
    # Reliability bins: labelled by upper edge; an empty bin exports its count but no accuracy.
    assert got[("evalstream_eval_reliability_samples", key_labels(KEY, bin="0.200"))] == 0
    assert ("evalstream_eval_reliability_accuracy_ratio", key_labels(KEY, bin="0.200")) not in got
    assert got[("evalstream_eval_reliability_accuracy_ratio", key_labels(KEY, bin="1.000"))] == pytest.approx(
        0.85
    )
    assert got[("evalstream_eval_reliability_confidence_ratio", key_labels(KEY, bin="0.600"))] == 0.5
    # No open evaluation: no progress series.
    assert not [k for k in got if k[0].startswith("evalstream_open_")]


def test_open_progress_aggregates_shards_of_the_newest_step() -> None:
    def shard(rank: int, step: int, samples: int, nll_sum: float, correct: int) -> ShardProgress:
        return ShardProgress(
            KEY,
            step,
            rank,
            4,
            ranks_closed=1,
            samples=samples,
            nll_sum=nll_sum,
            correct=correct,
            updated_at=50.0 + rank,
        )

    progress = MemoryProgress(
        [
            shard(0, 200, 100, 150.0, 40),
            shard(1, 200, 300, 450.0, 80),
            shard(0, 100, 999, 0.0, 0),  # an older open step of the same key is not live progress
        ]
    )
    got = samples(registry_with(MemoryFinalized(), progress))
    lab = key_labels(KEY)
    assert got[("evalstream_open_step", lab)] == 200
    assert got[("evalstream_open_world_size", lab)] == 4
    assert got[("evalstream_open_ranks_closed", lab)] == 1
    assert got[("evalstream_open_samples", lab)] == 400
    assert got[("evalstream_open_shard_samples", key_labels(KEY, rank="1"))] == 300
    assert got[("evalstream_open_running_nll", lab)] == 1.5
    assert got[("evalstream_open_running_accuracy_ratio", lab)] == 0.3
    assert got[("evalstream_open_last_update_timestamp_seconds", lab)] == 51.0


def test_series_bound_keeps_the_most_recently_updated_keys() -> None:
    finalized = MemoryFinalized()
    for i in range(25):
        key = SeriesKey("run", f"model-{i:02d}", "validation")
        finalized.put(FinalizedView(key, step=i, finalized_at=float(i), result=make_result()))
    # An old finalized key that is streaming again counts as recently updated.
    revived = SeriesKey("run", "model-00", "validation")
    progress = MemoryProgress([ShardProgress(revived, 1, 0, 1, 0, 10, 5.0, 5, updated_at=100.0)])
    got = samples(registry_with(finalized, progress, max_series=10))
    models = {dict(k[1])["model"] for k in got if k[0] == "evalstream_eval_nll"}
    assert models == {"model-00"} | {f"model-{i:02d}" for i in range(16, 25)}
    assert got[("evalstream_exporter_series_keys", ())] == 10
    assert got[("evalstream_exporter_dropped_keys", ())] == 15
    # Every labelled family stays within the bound (bins and ranks multiply it by a fixed factor).
    per_family: dict[str, set[tuple[str, str, str]]] = {}
    for name, labels in got:
        d = dict(labels)
        if "run" in d:
            per_family.setdefault(name, set()).add((d["run"], d["model"], d["split"]))
    assert per_family and all(len(keys) <= 10 for keys in per_family.values())


def test_a_failing_store_is_counted_not_raised() -> None:
    finalized = MemoryFinalized()
    finalized.put(FinalizedView(KEY, step=1, finalized_at=1.0, result=make_result()))
    registry = registry_with(finalized, MemoryProgress())
    finalized.fail = True
    got = samples(registry)
    assert got[("evalstream_exporter_scrape_errors_total", ())] == 1
    assert ("evalstream_eval_nll", key_labels(KEY)) not in got
    # The service's own metrics are still there.
    assert ("evalstream_ingest_chunks_total", ()) in got


def test_label_values_are_escaped() -> None:
    odd = SeriesKey('run "quoted"\nnewline', "m\\odel", "validation")
    finalized = MemoryFinalized()
    finalized.put(FinalizedView(odd, step=7, finalized_at=1.0, result=make_result()))
    got = samples(registry_with(finalized, MemoryProgress()))
    assert got[("evalstream_eval_step", key_labels(odd))] == 7


def test_promtool_accepts_the_exposition() -> None:
    finalized = MemoryFinalized()
    finalized.put(FinalizedView(KEY, step=300, finalized_at=1000.0, result=make_result()))
    progress = MemoryProgress([ShardProgress(SeriesKey("r", "m", "s"), 1, 0, 2, 0, 10, 5.0, 5, 1.0)])
    registry = registry_with(finalized, progress)
    telemetry_text = generate_latest(registry).decode()
    proc = promtool("check", "metrics", stdin=telemetry_text)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr
