"""The service's own metrics and the /metrics endpoint, over a real loopback HTTP socket."""

from __future__ import annotations

import ast
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from evalstream.service.exporter import QualityCollector
from evalstream.service.status import FinalizedView, SeriesKey
from evalstream.service.telemetry import REJECTION_REASONS, Telemetry, serve_metrics, split_address
from tests.observability.sources import MemoryFinalized, MemoryProgress, make_result


def test_split_address() -> None:
    assert split_address("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert split_address("[::1]:9464") == ("::1", 9464)
    assert split_address(":9464") == ("0.0.0.0", 9464)
    with pytest.raises(ValueError, match="host:port"):
        split_address("localhost")


def test_endpoint_serves_telemetry_and_quality_gauges() -> None:
    telemetry = Telemetry()
    finalized = MemoryFinalized()
    finalized.put(FinalizedView(SeriesKey("r", "m", "validation"), 3, 10.0, make_result(nll=0.75)))
    telemetry.registry.register(QualityCollector(finalized=finalized, progress=MemoryProgress()))
    telemetry.chunks.inc(3)
    telemetry.rejected_chunks.labels(reason="label_out_of_range").inc()
    telemetry.compute_seconds.observe(0.003)
    telemetry.rpc_errors.labels(method="GetEvaluation", code="NOT_FOUND").inc()
    endpoint = serve_metrics("127.0.0.1:0", telemetry.registry)
    try:
        assert endpoint.port > 0
        with urllib.request.urlopen(f"http://127.0.0.1:{endpoint.port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
    finally:
        endpoint.close()
    values = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }
    assert values[("evalstream_ingest_chunks_total", ())] == 3
    assert values[("evalstream_ingest_rejected_chunks_total", (("reason", "label_out_of_range"),))] == 1
    assert values[("evalstream_chunk_compute_seconds_bucket", (("le", "0.005"),))] == 1
    assert values[("evalstream_chunk_compute_seconds_bucket", (("le", "0.0025"),))] == 0
    assert values[("evalstream_rpc_errors_total", (("code", "NOT_FOUND"), ("method", "GetEvaluation")))] == 1
    assert values[("evalstream_eval_nll", (("model", "m"), ("run", "r"), ("split", "validation")))] == 0.75


def chunk_error_reasons() -> set[str]:
    """Every literal reason passed to ChunkError(...) in service/, found by parsing the source."""
    root = Path(__file__).resolve().parents[2] / "service"
    reasons = set()
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call) or not node.args:
                continue
            func = node.func
            name = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else ""
            )
            first = node.args[0]
            if name == "ChunkError" and isinstance(first, ast.Constant) and isinstance(first.value, str):
                reasons.add(first.value)
    return reasons


def test_rejection_counters_start_at_zero_for_every_reason() -> None:
    reasons = chunk_error_reasons()
    assert "label_out_of_range" in reasons  # the scan finds the engine's errors at all
    missing = reasons - set(REJECTION_REASONS)
    assert not missing, f"add these to telemetry.REJECTION_REASONS: {sorted(missing)}"
    text = generate_latest(Telemetry().registry).decode()
    values = {
        s.labels.get("reason"): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "evalstream_ingest_rejected_chunks_total"
    }
    assert values == dict.fromkeys(REJECTION_REASONS, 0.0)
