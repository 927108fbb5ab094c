"""Every bad request gets its status and a message saying what to fix, and changes nothing.

Bad chunks are refused in-band (the stream survives); protocol violations end
the stream. Each test ends by streaming good data and checking the result is
exactly the engine's on that data alone.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from evalstream.v1 import evaluation_pb2, service_pb2, service_pb2_grpc, tensor_pb2
from evalstream.wire import encode_tensor
from tests.service.conftest import NUM_CLASSES, small_settings
from tests.service.helpers import (
    Data,
    chunk_request,
    close_request,
    expected_result,
    key,
    make_data,
    open_request,
)
from tests.support.lockstep import LockStep


def _finish_and_check(stream: LockStep, channel: grpc.Channel, settings: Settings, next_seq: int) -> None:
    """Stream good data after the bad requests; the result must be the engine's on the good data only."""
    good = make_data(60, NUM_CLASSES, seed=42, id_offset=500)
    ack = stream.send(chunk_request(next_seq, good)).ack
    assert not ack.HasField("rejection") and ack.samples_committed == 60
    assert stream.send(close_request(next_seq + 1)).closed.finalized
    stream.end()
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    ref = evaluation_pb2.EvaluationRef(run="run-1", model="model-a", split="validation", step=0)
    result = stub.GetEvaluation(
        service_pb2.GetEvaluationRequest(ref=ref, include_per_class=True)
    ).evaluation.result
    assert result == expected_result(good, NUM_CLASSES, settings.engine_config())


def _bad_chunks(data: Data) -> list[tuple[str, service_pb2.StreamEvaluationRequest]]:
    out = []
    r = chunk_request(0, data)
    r.chunk.scores.dtype = tensor_pb2.DATA_TYPE_UNSPECIFIED
    out.append(("dtype_unspecified", r))
    r = chunk_request(0, data)
    r.chunk.scores.dtype = tensor_pb2.DATA_TYPE_INT64
    out.append(("bad_dtype", r))
    r = chunk_request(0, data)
    r.chunk.scores.raw_contents = r.chunk.scores.raw_contents[:-4]
    out.append(("byte_length_mismatch", r))
    r = chunk_request(0, data)
    r.chunk.scores.shape[:] = [-len(data), -NUM_CLASSES]
    out.append(("bad_shape", r))
    r = chunk_request(0, data)
    r.chunk.scores.CopyFrom(encode_tensor(np.zeros((len(data), NUM_CLASSES + 1), np.float32)))
    out.append(("shape_mismatch", r))
    r = chunk_request(0, data)
    r.chunk.labels.CopyFrom(encode_tensor(data.labels[:-1]))
    out.append(("label_count_mismatch", r))
    bad_labels = data.labels.copy()
    bad_labels[3] = NUM_CLASSES + 7
    r = chunk_request(0, data)
    r.chunk.labels.CopyFrom(encode_tensor(bad_labels))
    out.append(("label_out_of_range", r))
    return out


def test_bad_chunks_are_rejected_in_band_and_change_nothing(
    channel: grpc.Channel, settings: Settings
) -> None:
    data = make_data(20, NUM_CLASSES, seed=1)
    s = LockStep(channel)
    s.send(open_request())
    bad = _bad_chunks(data)
    for seq, (reason, request) in enumerate(bad):
        request.chunk.sequence = seq
        ack = s.send(request).ack
        assert ack.HasField("rejection"), reason
        assert (ack.rejection.reason, ack.rejection.code) == (reason, "INVALID_ARGUMENT")
        assert ack.rejection.sequence == seq and ack.rejection.message
        assert (ack.next_sequence, ack.samples_committed) == (seq + 1, 0)
    # A retried rejected chunk hears the same answer, not a silent "duplicate".
    retry = s.send(bad[2][1]).ack
    assert retry.duplicate and retry.rejection.reason == "byte_length_mismatch"
    _finish_and_check(s, channel, settings, len(bad))


def test_chunk_too_large_and_evaluation_too_large(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = small_settings(tmp_path / "d", max_chunk_rows=64, max_samples_per_evaluation=100)
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.target) as channel:
        s = LockStep(channel)
        s.send(open_request())
        ack = s.send(chunk_request(0, make_data(65, NUM_CLASSES))).ack
        assert (ack.rejection.reason, ack.rejection.code) == ("chunk_too_large", "RESOURCE_EXHAUSTED")
        assert "max_chunk_rows=64" in ack.rejection.message
        assert s.send(chunk_request(1, make_data(60, NUM_CLASSES, seed=3))).ack.samples_committed == 60
        ack = s.send(chunk_request(2, make_data(60, NUM_CLASSES, seed=4, id_offset=60))).ack
        assert (ack.rejection.reason, ack.rejection.code) == ("evaluation_too_large", "RESOURCE_EXHAUSTED")
        assert ack.samples_committed == 60
        assert s.send(close_request(3)).closed.samples == 60
        s.end()


def test_message_over_the_size_limit_ends_the_stream(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = small_settings(tmp_path / "d", max_message_bytes=64 * 1024)
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.target) as channel:
        s = LockStep(channel)
        s.send(open_request())
        error = s.fails(chunk_request(0, make_data(400, NUM_CLASSES)))  # 80 KB of scores
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


@pytest.mark.parametrize(
    ("first", "second", "code", "hint"),
    [
        (
            {"world_size": 2},
            {"world_size": 3, "rank": 1},
            grpc.StatusCode.FAILED_PRECONDITION,
            "world_size=2",
        ),
        (
            {"world_size": 2},
            {"world_size": 2, "rank": 1, "num_classes": 51},
            grpc.StatusCode.FAILED_PRECONDITION,
            "num_classes=50",
        ),
        ({"world_size": 2}, {"world_size": 2, "rank": 0}, grpc.StatusCode.ABORTED, "held by another"),
    ],
)
def test_open_disagreeing_with_the_open_shard(
    channel: grpc.Channel, settings: Settings, first: dict, second: dict, code: grpc.StatusCode, hint: str
) -> None:
    holder = LockStep(channel)
    holder.send(open_request(**first))
    error = LockStep(channel).fails(open_request(**second))
    assert error.code() == code
    assert hint in (error.details() or "")
    # The holder is unaffected and can finish (world size 2: close rank 1 too).
    _ = holder.send(chunk_request(0, make_data(10, NUM_CLASSES))).ack
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    got = stub.GetEvaluation(
        service_pb2.GetEvaluationRequest(ref=evaluation_pb2.EvaluationRef(run="run-1", model="model-a"))
    ).evaluation
    assert (got.world_size, got.num_classes, got.num_samples) == (2, NUM_CLASSES, 10)
    holder.end()


@pytest.mark.parametrize(
    ("request_", "code", "hint"),
    [
        (open_request(rank=4, world_size=4), grpc.StatusCode.INVALID_ARGUMENT, "out of range"),
        (open_request(num_classes=1), grpc.StatusCode.INVALID_ARGUMENT, "num_classes"),
        (open_request(model="bad/name"), grpc.StatusCode.INVALID_ARGUMENT, "not a valid name"),
        (open_request(run=""), grpc.StatusCode.INVALID_ARGUMENT, "not a valid name"),
        (chunk_request(0, make_data(5, NUM_CLASSES)), grpc.StatusCode.FAILED_PRECONDITION, "OpenShard"),
        (close_request(0), grpc.StatusCode.FAILED_PRECONDITION, "OpenShard"),
        (service_pb2.StreamEvaluationRequest(), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
    ],
)
def test_protocol_violations_end_the_stream(
    channel: grpc.Channel, request_: service_pb2.StreamEvaluationRequest, code: grpc.StatusCode, hint: str
) -> None:
    error = LockStep(channel).fails(request_)
    assert error.code() == code
    assert hint in (error.details() or "")
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    assert not stub.ListEvaluations(service_pb2.ListEvaluationsRequest()).evaluations


def test_sequence_gap_and_close_count_end_the_stream_without_losing_commits(
    channel: grpc.Channel, settings: Settings
) -> None:
    data = make_data(40, NUM_CLASSES, seed=2)
    s = LockStep(channel)
    s.send(open_request())
    s.send(chunk_request(0, data))
    error = s.fails(chunk_request(2, data))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "resend from 1" in (error.details() or "")
    s2 = LockStep(channel)
    assert s2.send(open_request()).opened.samples_committed == 40
    error = s2.fails(close_request(5))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has 1 committed" in (error.details() or "")
    s3 = LockStep(channel)
    assert s3.send(open_request()).opened.next_sequence == 1
    ack = s3.send(chunk_request(1, make_data(60, NUM_CLASSES, seed=42, id_offset=500))).ack
    assert ack.samples_committed == 100
    s3.end()


def test_unknown_evaluations_are_not_found_and_bad_metrics_invalid(channel: grpc.Channel) -> None:
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    ref = evaluation_pb2.EvaluationRef(run="run-1", model="nope")
    calls = [
        lambda: stub.GetEvaluation(service_pb2.GetEvaluationRequest(ref=ref)),
        lambda: stub.FinalizeEvaluation(service_pb2.FinalizeEvaluationRequest(key=key(step=3))),
        lambda: stub.PinEvaluation(service_pb2.PinEvaluationRequest(key=key(step=3), pinned=True)),
    ]
    for call in calls:
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no evaluation" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        stub.CompareModels(service_pb2.CompareModelsRequest(run="run-1", primary_metric="mean_confidence"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "valid:" in (info.value.details() or "") and "nll" in (info.value.details() or "")
    with pytest.raises(grpc.RpcError) as info:
        stub.ListEvaluations(service_pb2.ListEvaluationsRequest(page_token="xyz"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_open_shard_limits(tmp_path) -> None:  # type: ignore[no-untyped-def]
    settings = small_settings(tmp_path / "d", max_open_shards=2)
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.target) as channel:
        held = [LockStep(channel) for _ in range(2)]
        for rank, s in enumerate(held):
            s.send(open_request(rank=rank, world_size=3))
        error = LockStep(channel).fails(open_request(rank=2, world_size=3))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_open_shards=2" in (error.details() or "")
        for s in held:
            s.end()
