"""The exporter inside the real server: the series bound, and gauges coming back after a restart."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from evalstream.v1 import evaluation_pb2, service_pb2_grpc
from tests.observability.streaming import make_data, stream_shard
from tests.support.servers import small_settings

server_mod = pytest.importorskip("evalstream.service.server")


def start(data_dir: Path, **overrides: object) -> object:
    settings = small_settings(data_dir, metrics_address="127.0.0.1:0", **overrides)
    return server_mod.BackgroundServer(settings).start()


def scrape(srv: object) -> list[tuple[str, dict[str, str], float]]:
    with urllib.request.urlopen(f"http://{srv.metrics_target}/metrics", timeout=10) as r:  # type: ignore[attr-defined]
        text = r.read().decode()
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def stream(srv: object, run: str, model: str, step: int, seed: int) -> None:
    with grpc.insecure_channel(srv.target) as channel:  # type: ignore[attr-defined]
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        key = evaluation_pb2.EvaluationKey(run=run, model=model, split="validation", step=step)
        replies = stream_shard(stub, key, make_data(seed, 64, 10, 1.0), rows=32)
        assert replies[-1].closed.finalized


def keys_of(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, set[tuple[str, str, str]]]:
    out: dict[str, set[tuple[str, str, str]]] = {}
    for name, labels, _ in samples:
        if "run" in labels:
            out.setdefault(name, set()).add((labels["run"], labels["model"], labels["split"]))
    return out


def test_series_stay_under_the_bound(tmp_path: Path) -> None:
    bound = 3
    srv = start(tmp_path / "data", exporter_max_series=bound)
    try:
        pairs = [(f"run-{i % 2}", f"model-{i}") for i in range(7)]
        for i, (run, model) in enumerate(pairs):
            stream(srv, run, model, step=i, seed=i)
        samples = scrape(srv)
    finally:
        srv.stop(grace=0.5)  # type: ignore[attr-defined]
    families = keys_of(samples)
    assert families, "no labelled series at all"
    newest = {(run, model, "validation") for run, model in pairs[-bound:]}
    for name, keys in families.items():
        assert keys <= newest, name  # within the bound, and the least recently updated went first
    assert families["evalstream_eval_nll"] == newest
    meta = {name: value for name, labels, value in samples if not labels}
    assert meta["evalstream_exporter_series_keys"] == bound
    assert meta["evalstream_exporter_dropped_keys"] == len(pairs) - bound
    # No per-sample or per-class label anywhere.
    label_names = {k for _, labels, _ in samples for k in labels}
    assert label_names <= {
        "run",
        "model",
        "split",
        "bin",
        "rank",
        "reason",
        "method",
        "code",
        "le",
        "mode",
        "outcome",
    }


def test_finalized_gauges_come_back_after_a_restart(tmp_path: Path) -> None:
    srv = start(tmp_path / "data")
    try:
        stream(srv, "run", "model-a", step=5, seed=1)
        stream(srv, "run", "model-b", step=7, seed=2)
        before = {
            (n, tuple(sorted(lab.items()))): v
            for n, lab, v in scrape(srv)
            if n.startswith("evalstream_eval_")
        }
    finally:
        srv.stop(grace=0.5)  # type: ignore[attr-defined]
    srv = start(tmp_path / "data")
    try:
        after = {
            (n, tuple(sorted(lab.items()))): v
            for n, lab, v in scrape(srv)
            if n.startswith("evalstream_eval_")
        }
        counters = {n: v for n, lab, v in scrape(srv) if n == "evalstream_ingest_chunks_total"}
    finally:
        srv.stop(grace=0.5)  # type: ignore[attr-defined]
    assert len(before) > 40
    assert after == before
    assert counters == {
        "evalstream_ingest_chunks_total": 0.0
    }  # process counters restart; gauges come from the store


def test_a_collapsed_model_reads_near_chance_on_the_dashboard(tmp_path: Path) -> None:
    """Constant logits (a dead network) must not show as a triumph: the accuracy gauges read chance
    and the tie-share gauge says why."""
    import numpy as np

    from tests.observability.streaming import Data

    classes = 40
    good = make_data(1, 400, classes, 2.0)
    collapsed = Data(np.zeros_like(good.scores), good.labels)
    srv = start(tmp_path / "data")
    try:
        with grpc.insecure_channel(srv.target) as channel:  # type: ignore[attr-defined]
            stub = service_pb2_grpc.EvalStreamServiceStub(channel)
            key = evaluation_pb2.EvaluationKey(run="r", model="collapsed", split="validation", step=1)
            assert stream_shard(stub, key, collapsed, rows=100)[-1].closed.finalized
        samples = scrape(srv)
    finally:
        srv.stop(grace=0.5)  # type: ignore[attr-defined]
    gauges = {name: value for name, labels, value in samples if labels.get("model") == "collapsed"}
    assert gauges["evalstream_eval_accuracy_top1_ratio"] == pytest.approx(1 / classes, rel=1e-9)
    assert gauges["evalstream_eval_accuracy_top5_ratio"] == pytest.approx(5 / classes, rel=1e-9)
    assert gauges["evalstream_eval_balanced_accuracy_ratio"] == pytest.approx(1 / classes, rel=1e-9)
    assert gauges["evalstream_eval_label_tie_share_ratio"] == 1.0
