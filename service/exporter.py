"""Prometheus collector for model quality and live evaluation progress.

Values are read from the store and from ingest at scrape time instead of being
pushed into labelled global gauges: a global gauge keeps every label set it has
ever seen, so a long-lived server would grow one series per (run, model, split)
forever. Here each scrape exports at most ``max_series`` keys, the most recently
updated ones, and a key that falls out of the window simply stops being exported.
After a restart the finalized gauges come back because they are read from the store.

No label carries request contents: only run / model / split names, a shard rank,
a bounded reliability-bin edge, and nothing per sample or per class.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from evalstream.service.engine.registry import MetricInfo, metric_infos
from evalstream.service.status import FinalizedSource, FinalizedView, ProgressSource, SeriesKey, ShardProgress

log = logging.getLogger(__name__)

PREFIX = "evalstream"
KEY_LABELS = ("run", "model", "split")
DEFAULT_MAX_SERIES = 1000
# The engine's bin count is a small setting (15 by default); this guards the label anyway.
MAX_RELIABILITY_BINS = 100
# Top-k values a server can report; only used to look up help texts.
_KNOWN_TOP_K = tuple(range(1, 101))
_NAME_SAFE = re.compile(r"[^a-zA-Z0-9_]")


def quality_metric_name(metric: str, info: MetricInfo | None) -> str:
    """Prometheus name of one headline metric: ``evalstream_eval_<name>[_ratio]``.

    The suffix follows the registry's ``is_ratio`` so fractions read as fractions
    (``evalstream_eval_ece_ratio``), while unbounded values such as the NLL in nats
    keep the bare name.
    """
    base = f"{PREFIX}_eval_{_NAME_SAFE.sub('_', metric)}"
    return f"{base}_ratio" if info is not None and info.is_ratio else base


def _help_for(metric: str, info: MetricInfo | None) -> str:
    text = info.description if info is not None else f"Engine metric {metric!r} (see ListMetrics)"
    return f"{text}; latest finalized step per run/model/split"


@dataclass
class _KeyState:
    """Everything exported for one (run, model, split) in one scrape."""

    key: SeriesKey
    updated_at: float = 0.0
    finalized: FinalizedView | None = None
    shards: list[ShardProgress] = field(default_factory=list)


def _latest_open(shards: list[ShardProgress]) -> list[ShardProgress]:
    """Shards of the newest open step only; older open steps of the same key are not live progress."""
    if not shards:
        return shards
    step = max(s.step for s in shards)
    return [s for s in shards if s.step == step]


class QualityCollector(Collector):
    """Custom collector: quality gauges of finalized evaluations and progress of open ones.

    ``finalized`` and ``progress`` are read on every scrape; they must be safe to call
    from the metrics HTTP thread. ``max_series`` bounds the number of (run, model, split)
    keys exported, keeping the most recently updated ones.
    """

    def __init__(
        self,
        finalized: FinalizedSource,
        progress: ProgressSource,
        max_series: int = DEFAULT_MAX_SERIES,
    ) -> None:
        if max_series < 1:
            raise ValueError(f"max_series must be >= 1, got {max_series}")
        self._finalized = finalized
        self._progress = progress
        self._max_series = max_series
        self._infos = metric_infos(_KNOWN_TOP_K)
        self._lock = threading.Lock()
        self._scrape_errors = 0

    # -- prometheus_client hooks -------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """Fixed families only, so registering never touches the store."""
        return list(self._meta_families(0, 0, 0))

    def collect(self) -> Iterable[Metric]:
        """Read both sources once and turn them into metric families."""
        try:
            states = self._gather()
        except Exception:  # a broken store must not take the service metrics down with it
            log.exception("exporter: reading evaluation state failed")
            with self._lock:
                self._scrape_errors += 1
            states = {}
        kept = sorted(states.values(), key=lambda s: (-s.updated_at, s.key.run, s.key.model, s.key.split))
        exported = kept[: self._max_series]
        with self._lock:
            errors = self._scrape_errors
        yield from self._meta_families(len(exported), len(kept) - len(exported), errors)
        yield from self._quality_families([s.finalized for s in exported if s.finalized is not None])
        yield from self._progress_families([s for s in exported if s.shards])

    # -- internals ---------------------------------------------------------------

    def _gather(self) -> dict[SeriesKey, _KeyState]:
        states: dict[SeriesKey, _KeyState] = {}
        for view in self._finalized.latest_finalized():
            st = states.setdefault(view.key, _KeyState(view.key))
            if st.finalized is None or view.step >= st.finalized.step:
                st.finalized = view
            st.updated_at = max(st.updated_at, view.finalized_at)
        for shard in self._progress.open_progress():
            st = states.setdefault(shard.key, _KeyState(shard.key))
            st.shards.append(shard)
            st.updated_at = max(st.updated_at, shard.updated_at)
        for st in states.values():
            st.shards = _latest_open(st.shards)
        return states

    def _meta_families(self, exported: int, dropped: int, errors: int) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            f"{PREFIX}_exporter_series_keys",
            "Distinct run/model/split keys exported in this scrape (bounded by max_series)",
            value=exported,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_exporter_dropped_keys",
            "Least recently updated run/model/split keys left out of this scrape by the max_series bound",
            value=dropped,
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_exporter_max_series_keys",
            "Configured bound on exported run/model/split keys",
            value=self._max_series,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_exporter_scrape_errors",
            "Scrapes in which reading the store or ingest state failed",
            value=errors,
        )

    def _quality_families(self, views: list[FinalizedView]) -> Iterator[Metric]:
        step = GaugeMetricFamily(
            f"{PREFIX}_eval_step", "Training step of the latest finalized evaluation", labels=KEY_LABELS
        )
        samples = GaugeMetricFamily(
            f"{PREFIX}_eval_samples", "Distinct samples in the latest finalized evaluation", labels=KEY_LABELS
        )
        classes = GaugeMetricFamily(
            f"{PREFIX}_eval_classes",
            "Number of classes of the latest finalized evaluation",
            labels=KEY_LABELS,
        )
        finalized_at = GaugeMetricFamily(
            f"{PREFIX}_eval_finalized_timestamp_seconds",
            "Unix time the latest evaluation was finalized",
            labels=KEY_LABELS,
        )
        bin_labels = (*KEY_LABELS, "bin")
        bin_acc = GaugeMetricFamily(
            f"{PREFIX}_eval_reliability_accuracy_ratio",
            "Top-1 accuracy within a reliability-diagram bin (bin = upper confidence edge)",
            labels=bin_labels,
        )
        bin_conf = GaugeMetricFamily(
            f"{PREFIX}_eval_reliability_confidence_ratio",
            "Mean top-1 confidence within a reliability-diagram bin (bin = upper confidence edge)",
            labels=bin_labels,
        )
        bin_count = GaugeMetricFamily(
            f"{PREFIX}_eval_reliability_samples",
            "Samples whose top-1 confidence falls in a reliability-diagram bin (bin = upper edge)",
            labels=bin_labels,
        )
        per_metric: dict[str, GaugeMetricFamily] = {}
        for view in views:
            labels = [view.key.run, view.key.model, view.key.split]
            result = view.result
            step.add_metric(labels, float(view.step))
            samples.add_metric(labels, float(result.num_samples))
            classes.add_metric(labels, float(result.num_classes))
            finalized_at.add_metric(labels, view.finalized_at)
            for metric, value in sorted(result.metrics.items()):
                info = self._infos.get(metric)
                name = quality_metric_name(metric, info)
                fam = per_metric.get(name)
                if fam is None:
                    fam = per_metric[name] = GaugeMetricFamily(
                        name, _help_for(metric, info), labels=KEY_LABELS
                    )
                fam.add_metric(labels, float(value))
            for b in list(result.calibration.bins)[:MAX_RELIABILITY_BINS]:
                edge = [*labels, f"{b.upper:.3f}"]
                bin_count.add_metric(edge, float(b.count))
                # An empty bin has no accuracy or confidence; leave a gap rather than a fake 0.
                if b.count > 0:
                    bin_acc.add_metric(edge, b.accuracy)
                    bin_conf.add_metric(edge, b.mean_confidence)
        yield from (step, samples, classes, finalized_at, bin_acc, bin_conf, bin_count)
        yield from (per_metric[n] for n in sorted(per_metric))

    def _progress_families(self, states: list[_KeyState]) -> Iterator[Metric]:
        step = GaugeMetricFamily(
            f"{PREFIX}_open_step", "Training step of the evaluation being streamed", labels=KEY_LABELS
        )
        world = GaugeMetricFamily(
            f"{PREFIX}_open_world_size", "Ranks expected to stream the open evaluation", labels=KEY_LABELS
        )
        closed = GaugeMetricFamily(
            f"{PREFIX}_open_ranks_closed",
            "Ranks that have closed their shard of the open evaluation",
            labels=KEY_LABELS,
        )
        total = GaugeMetricFamily(
            f"{PREFIX}_open_samples", "Samples committed so far in the open evaluation", labels=KEY_LABELS
        )
        shard_samples = GaugeMetricFamily(
            f"{PREFIX}_open_shard_samples",
            "Samples committed so far by one rank of the open evaluation",
            labels=(*KEY_LABELS, "rank"),
        )
        running_nll = GaugeMetricFamily(
            f"{PREFIX}_open_running_nll",
            "Mean NLL (nats) over the samples committed so far in the open evaluation",
            labels=KEY_LABELS,
        )
        running_acc = GaugeMetricFamily(
            f"{PREFIX}_open_running_accuracy_ratio",
            "Top-1 accuracy over the samples committed so far in the open evaluation",
            labels=KEY_LABELS,
        )
        updated = GaugeMetricFamily(
            f"{PREFIX}_open_last_update_timestamp_seconds",
            "Unix time of the last committed chunk or shard change of the open evaluation",
            labels=KEY_LABELS,
        )
        for st in states:
            labels = [st.key.run, st.key.model, st.key.split]
            shards = st.shards
            n = sum(s.samples for s in shards)
            step.add_metric(labels, float(shards[0].step))
            world.add_metric(labels, float(max(s.world_size for s in shards)))
            closed.add_metric(labels, float(max(s.ranks_closed for s in shards)))
            total.add_metric(labels, float(n))
            updated.add_metric(labels, max(s.updated_at for s in shards))
            for s in sorted(shards, key=lambda s: s.rank):
                shard_samples.add_metric([*labels, str(s.rank)], float(s.samples))
            if n > 0:
                nll = sum(s.nll_sum for s in shards) / n
                if math.isfinite(nll):
                    running_nll.add_metric(labels, nll)
                running_acc.add_metric(labels, sum(s.correct for s in shards) / n)
        yield from (step, world, closed, total, shard_samples, running_nll, running_acc, updated)
