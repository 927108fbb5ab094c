"""What the running server offers besides ingest: health, reflection, Prometheus, metrics list,
pinning and retention through the API, and CompareModels on stored evaluations."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from prometheus_client.parser import text_string_to_metric_families

from evalstream.service.server import BackgroundServer
from evalstream.v1 import evaluation_pb2, service_pb2, service_pb2_grpc
from tests.service.conftest import NUM_CLASSES, small_settings
from tests.service.helpers import Data, chunk_request, close_request, make_data, open_request
from tests.support.lockstep import LockStep


def _stream_one(
    channel: grpc.Channel, data: Data, step: int = 0, model: str = "model-a", pin: bool = False
) -> None:
    s = LockStep(channel)
    s.send(open_request(step=step, model=model, pin=pin))
    s.send(chunk_request(0, data))
    assert s.send(close_request(1)).closed.finalized
    s.end()


def test_health_and_reflection_answer(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "evalstream.v1.EvalStreamService"):
        reply = health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"evalstream.v1.EvalStreamService", "grpc.health.v1.Health"} <= services
    method = db.FindFileContainingSymbol("evalstream.v1.EvalStreamService")
    assert method.package == "evalstream.v1"


def test_list_metrics_gives_directions(channel: grpc.Channel) -> None:
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    reply = stub.ListMetrics(service_pb2.ListMetricsRequest())
    by_name = {m.name: m for m in reply.metrics}
    assert reply.default_primary_metric == "nll"
    assert by_name["nll"].higher_is_better is False and by_name["accuracy_top5"].higher_is_better is True
    assert not by_name["mean_confidence"].HasField("higher_is_better")


def test_prometheus_endpoint_serves_ingest_and_quality_metrics(tmp_path: Path) -> None:
    settings = small_settings(tmp_path / "d", metrics_address="127.0.0.1:0")
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.target) as channel:
        _stream_one(channel, make_data(64, NUM_CLASSES))
        url = f"http://{srv.metrics_target}/metrics"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    chunks = families["evalstream_ingest_chunks"].samples
    assert any(s.name == "evalstream_ingest_chunks_total" and s.value == 1 for s in chunks)
    samples = [s for s in families["evalstream_ingest_samples"].samples if s.name.endswith("_total")]
    assert samples[0].value == 64
    nll = families["evalstream_eval_nll"].samples
    assert [(s.labels, s.value > 0) for s in nll] == [
        ({"run": "run-1", "model": "model-a", "split": "validation"}, True)
    ]
    assert families["evalstream_eval_samples"].samples[0].value == 64


def test_pin_and_retention_through_the_api(tmp_path: Path) -> None:
    settings = small_settings(tmp_path / "d", retention_keep_latest=1)
    data = make_data(40, NUM_CLASSES, seed=3)
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.target) as channel:
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        _stream_one(channel, data, step=0)
        pinned = stub.PinEvaluation(
            service_pb2.PinEvaluationRequest(
                key=evaluation_pb2.EvaluationKey(run="run-1", model="model-a", split="validation", step=0),
                pinned=True,
            )
        ).evaluation
        assert pinned.pinned and pinned.records_available
        _stream_one(channel, data, step=1)
        _stream_one(channel, data, step=2)
        listed = stub.ListEvaluations(service_pb2.ListEvaluationsRequest(run="run-1")).evaluations
    by_step = {e.key.step: e for e in listed}
    assert {s: e.records_available for s, e in by_step.items()} == {0: True, 1: False, 2: True}
    assert by_step[1].result.metrics["nll"] == by_step[2].result.metrics["nll"] > 0  # metrics kept
    assert by_step[1].state == evaluation_pb2.EVALUATION_STATE_FINALIZED


def test_lowered_retention_applies_at_restart(tmp_path: Path) -> None:
    data = make_data(40, NUM_CLASSES, seed=5)
    with (
        BackgroundServer(small_settings(tmp_path / "d", retention_keep_latest=5)) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        for step in range(3):
            _stream_one(channel, data, step=step)
    with (
        BackgroundServer(small_settings(tmp_path / "d", retention_keep_latest=1)) as srv,
        grpc.insecure_channel(srv.target) as channel,
    ):
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        listed = stub.ListEvaluations(service_pb2.ListEvaluationsRequest(run="run-1")).evaluations
    assert {e.key.step: e.records_available for e in listed} == {0: False, 1: False, 2: True}
    assert all(e.result.metrics["nll"] > 0 for e in listed)  # metrics stay


def test_compare_models_ranks_stored_evaluations(channel: grpc.Channel) -> None:
    good = make_data(120, NUM_CLASSES, seed=4)
    worse = Data(good.scores * 0.3, good.labels, good.ids)  # same samples, less confident
    _stream_one(channel, good, model="model-a")
    _stream_one(channel, worse, model="model-b")
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    reply = stub.CompareModels(service_pb2.CompareModelsRequest(run="run-1", bootstrap_replicates=50, seed=1))
    assert reply.primary_metric == "nll" and not reply.higher_is_better
    assert [c.ref.model for c in reply.candidates] == ["model-a", "model-b"]
    assert reply.paired and reply.common_samples == 120
    by_ref = stub.CompareModels(
        service_pb2.CompareModelsRequest(
            candidates=[
                evaluation_pb2.EvaluationRef(run="run-1", model="model-b"),
                evaluation_pb2.EvaluationRef(run="run-1", model="model-a"),
            ],
            primary_metric="accuracy_top1",
            bootstrap_replicates=50,
        )
    )
    assert by_ref.primary_metric == "accuracy_top1" and by_ref.higher_is_better
    assert {c.ref.model for c in by_ref.candidates} == {"model-a", "model-b"}
