"""The service's own Prometheus metrics (ingest, latency, errors).

One ``Telemetry`` object per server, on its own ``CollectorRegistry`` so tests
can run several servers in one process. Model-quality gauges are not here: they
come from a custom collector reading the store at scrape time (exporter.py).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Seconds; chunk work is sub-millisecond to tens of milliseconds.
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Seconds; a finalize merges every rank's records: milliseconds to minutes.
_FINALIZE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

# Reasons a chunk can be refused (ChunkError.reason). Their counters start at 0 so that
# rate() sees the first rejection of each reason: a labelled counter that is born at 1
# has no earlier sample to rise from. tests/observability/test_telemetry.py checks this
# list against the ChunkError reasons raised in service/; an unlisted reason still counts.
REJECTION_REASONS = (
    "bad_dtype",
    "bad_shape",
    "byte_length_mismatch",
    "chunk_too_large",
    "class_count_mismatch",
    "dtype_unspecified",
    "evaluation_too_large",
    "label_count_mismatch",
    "label_dtype",
    "label_out_of_range",
    "log_probabilities_invalid",
    "non_finite",
    "pred_out_of_range",
    "rank_inconsistent",
    "rank_out_of_range",
    "record_out_of_bounds",
    "records_layout_version",
    "sample_id_dtype",
    "sample_id_negative",
    "sample_ids_length",
    "score_dtype",
    "shape_mismatch",
    "ties_out_of_range",
)

# How a GetEvaluation long poll ended (service/finalizations.py).
WAIT_OUTCOMES = ("notified", "polled", "timeout")

# Where a shard's scores are reduced (OpenShard.reduce); the byte counter is split by it.
REDUCE_MODES = ("server", "client")


class Telemetry:
    """Counters, histograms and gauges the server updates as it works."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.chunks = Counter("evalstream_ingest_chunks", "Chunks committed", registry=r)
        self.samples = Counter("evalstream_ingest_samples", "Samples committed", registry=r)
        self.bytes = Counter(
            "evalstream_ingest_bytes", "Score tensor bytes received in committed chunks", registry=r
        )
        self.mode_bytes = Counter(
            "evalstream_ingest_mode_bytes",
            "Payload bytes received in committed chunks, by reduction mode "
            "(server: score tensors; client: record columns)",
            ["mode"],
            registry=r,
        )
        for mode in REDUCE_MODES:
            self.mode_bytes.labels(mode=mode)
        self.duplicate_chunks = Counter(
            "evalstream_ingest_duplicate_chunks",
            "Re-sent chunks acknowledged without counting them again",
            registry=r,
        )
        self.rejected_chunks = Counter(
            "evalstream_ingest_rejected_chunks", "Chunks refused, by reason", ["reason"], registry=r
        )
        for reason in REJECTION_REASONS:
            self.rejected_chunks.labels(reason=reason)
        self.decode_seconds = Histogram(
            "evalstream_chunk_decode_seconds",
            "Time to decode a chunk's tensors",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = Histogram(
            "evalstream_chunk_compute_seconds",
            "Time to reduce a chunk to per-sample records",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.commit_seconds = Histogram(
            "evalstream_store_commit_seconds",
            "Time to durably commit a chunk",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.active_streams = Gauge("evalstream_active_streams", "Open StreamEvaluation calls", registry=r)
        self.finalized = Counter("evalstream_evaluations_finalized", "Evaluations finalized", registry=r)
        self.finalize_seconds = Histogram(
            "evalstream_finalize_seconds",
            "Time from the start of a finalize (merge, metrics) to its result committed",
            buckets=_FINALIZE_BUCKETS,
            registry=r,
        )
        self.waits = Counter(
            "evalstream_waits",
            "GetEvaluation long polls that waited, by how they ended: notified (a finalization was "
            "announced), polled (a store check found it finalized) or timeout (the wait elapsed)",
            ["outcome"],
            registry=r,
        )
        for outcome in WAIT_OUTCOMES:  # born at 0, so rate() sees the first of each
            self.waits.labels(outcome=outcome)
        self.waiting = Gauge(
            "evalstream_waits_in_progress", "GetEvaluation long polls waiting now", registry=r
        )
        self.rpc_errors = Counter(
            "evalstream_rpc_errors", "RPCs that ended with an error status", ["method", "code"], registry=r
        )

    def count_bytes(self, mode: str, num_bytes: int) -> None:
        """A committed chunk's payload: score bytes in the legacy counter, every mode's in its own."""
        if mode == "server":
            self.bytes.inc(num_bytes)
        self.mode_bytes.labels(mode=mode).inc(num_bytes)


class MetricsEndpoint:
    """A running /metrics HTTP endpoint; ``port`` is the bound port (useful with port 0)."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        self.host = str(server.server_address[0])
        self.port = int(server.server_address[1])

    def close(self) -> None:
        """Stop serving and release the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` to (host, port); an empty host means every interface."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"metrics address must be host:port, got {address!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


def serve_metrics(
    address: str, registry: CollectorRegistry, tls: Mapping[str, Any] | None = None
) -> MetricsEndpoint:
    """Serve ``registry`` at http://address/metrics in a daemon thread.

    Kept apart from the gRPC port so operators can bind it to an internal
    interface; it only ever shows aggregate numbers, never request contents.
    ``tls`` is passed on to ``start_http_server`` (certfile, keyfile, client_cafile, ...),
    e.g. ``auth.metrics_tls_options(settings)``.
    """
    host, port = split_address(address)
    server, thread = start_http_server(port, addr=host, registry=registry, **dict(tls or {}))
    return MetricsEndpoint(server, thread)
