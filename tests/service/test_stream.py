"""End to end over a real grpc.aio server: ranks streaming concurrently, retries, resume, finalize."""

from __future__ import annotations

import grpc
import pytest

from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from evalstream.v1 import evaluation_pb2, service_pb2, service_pb2_grpc
from tests.service.conftest import NUM_CLASSES, small_settings
from tests.service.helpers import (
    chunk_request,
    close_request,
    concat,
    expected_result,
    key,
    make_data,
    open_request,
    run_ranks,
)
from tests.support.lockstep import LockStep, reopen


def _get(channel: grpc.Channel, step: int = 0, per_class: bool = True) -> evaluation_pb2.Evaluation:
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    ref = evaluation_pb2.EvaluationRef(run="run-1", model="model-a", split="validation", step=step)
    return stub.GetEvaluation(
        service_pb2.GetEvaluationRequest(ref=ref, include_per_class=per_class)
    ).evaluation


def test_four_ranks_concurrently_equal_the_engine_on_the_concatenated_data(
    server: BackgroundServer, channel: grpc.Channel, settings: Settings
) -> None:
    parts = [make_data(300 + 17 * r, NUM_CLASSES, seed=r, id_offset=10_000 * r) for r in range(4)]
    summaries = run_ranks(channel, parts, rows=64, num_classes=NUM_CLASSES)
    assert sum(s.finalized for s in summaries) == 1
    assert sorted(s.samples for s in summaries) == sorted(len(p) for p in parts)
    evaluation = _get(channel)
    assert evaluation.state == evaluation_pb2.EVALUATION_STATE_FINALIZED
    assert evaluation.ranks_closed == 4 and evaluation.world_size == 4
    assert evaluation.records_available
    expected = expected_result(concat(parts), NUM_CLASSES, settings.engine_config())
    assert evaluation.result == expected
    assert evaluation.num_samples == sum(len(p) for p in parts)


def test_retried_chunks_are_acknowledged_and_not_counted_again(
    channel: grpc.Channel, settings: Settings
) -> None:
    data = make_data(200, NUM_CLASSES, seed=5)
    s = LockStep(channel)
    assert s.send(open_request()).opened.next_sequence == 0
    first = s.send(chunk_request(0, data.part(0, 100))).ack
    second = s.send(chunk_request(1, data.part(100, 200))).ack
    assert (first.next_sequence, second.next_sequence, second.samples_committed) == (1, 2, 200)
    for seq, part in ((1, data.part(100, 200)), (0, data.part(0, 100))):
        retry = s.send(chunk_request(seq, part)).ack
        assert retry.duplicate and not retry.HasField("rejection")
        assert (retry.next_sequence, retry.samples_committed) == (2, 200)
    closed = s.send(close_request(2)).closed
    s.end()
    assert closed.finalized and closed.samples == 200 and closed.chunks == 2
    evaluation = _get(channel)
    assert evaluation.result == expected_result(data, NUM_CLASSES, settings.engine_config())
    assert evaluation.result.duplicates_dropped == 0


def test_reopen_tells_the_resume_point_and_streaming_continues(
    channel: grpc.Channel, settings: Settings
) -> None:
    data = make_data(300, NUM_CLASSES, seed=6)
    s = LockStep(channel)
    s.send(open_request(rank=1, world_size=2))
    for seq in range(2):
        s.send(chunk_request(seq, data.part(100 * seq, 100 * seq + 100)))
    s.call.cancel()  # the connection drops before close

    # The old stream's lease is released once the server notices the cancellation.
    resumed, response = reopen(channel, open_request(rank=1, world_size=2))
    opened = response.opened
    assert (opened.next_sequence, opened.samples_committed) == (2, 200)
    assert not opened.already_closed
    assert resumed.send(chunk_request(2, data.part(200, 300))).ack.next_sequence == 3
    closed = resumed.send(close_request(3)).closed
    resumed.end()
    assert closed.samples == 300 and not closed.finalized and closed.ranks_closed == 1

    # Reopening a closed shard says so and accepts nothing more.
    again = LockStep(channel)
    opened = again.send(open_request(rank=1, world_size=2)).opened
    assert opened.already_closed and opened.next_sequence == 3
    again.end()

    other = make_data(50, NUM_CLASSES, seed=7, id_offset=1000)
    s0 = LockStep(channel)
    s0.send(open_request(rank=0, world_size=2))
    s0.send(chunk_request(0, other))
    assert s0.send(close_request(1)).closed.finalized
    s0.end()
    assert _get(channel).result == expected_result(
        concat([other, data]), NUM_CLASSES, settings.engine_config()
    )


def test_explicit_finalize_stops_accepting_chunks_from_open_ranks(channel: grpc.Channel) -> None:
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    data = make_data(120, NUM_CLASSES, seed=8)
    s = LockStep(channel)
    s.send(open_request(rank=0, world_size=3))
    s.send(chunk_request(0, data.part(0, 60)))
    response = stub.FinalizeEvaluation(service_pb2.FinalizeEvaluationRequest(key=key()))
    assert response.evaluation.state == evaluation_pb2.EVALUATION_STATE_FINALIZED
    assert response.evaluation.result.num_samples == 60
    again = stub.FinalizeEvaluation(service_pb2.FinalizeEvaluationRequest(key=key()))
    assert again.evaluation.finalized_at == response.evaluation.finalized_at
    error = s.fails(chunk_request(1, data.part(60, 120)))
    assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "finalized" in (error.details() or "")
    assert _get(channel).result.num_samples == 60


def test_half_precision_scores_and_duplicate_sample_ids(channel: grpc.Channel, settings: Settings) -> None:
    import torch

    from evalstream.wire import encode_tensor

    data = make_data(80, NUM_CLASSES, seed=9)
    s = LockStep(channel)
    s.send(open_request())
    half = chunk_request(0, data.part(0, 40))
    half.chunk.scores.CopyFrom(encode_tensor(data.scores[:40].astype("float16")))
    bf16 = chunk_request(1, data.part(40, 80))
    bf16.chunk.scores.CopyFrom(encode_tensor(torch.from_numpy(data.scores[40:80]).to(torch.bfloat16)))
    padded = chunk_request(2, data.part(0, 10))  # DistributedSampler padding: ids seen before
    for seq, request in enumerate((half, bf16, padded)):
        ack = s.send(request).ack
        assert not ack.HasField("rejection"), ack.rejection
        assert ack.next_sequence == seq + 1
    s.send(close_request(3))
    s.end()
    result = _get(channel).result
    assert result.num_samples == 80 and result.duplicates_dropped == 10


def test_three_thousand_classes_two_ranks(tmp_path) -> None:  # type: ignore[no-untyped-def]
    c = 3000
    settings = small_settings(tmp_path / "data")
    parts = [make_data(150, c, seed=20 + r, id_offset=1000 * r) for r in range(2)]
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.target) as channel:
        run_ranks(channel, parts, rows=80, num_classes=c)  # ~0.9 MiB chunks
        evaluation = _get(channel)
    assert evaluation.num_classes == c
    assert evaluation.result == expected_result(concat(parts), c, settings.engine_config())
    assert len(evaluation.result.imbalance.per_class.support) == c


@pytest.mark.parametrize("page_size", [1, 2])
def test_list_is_newest_first_and_paginated(channel: grpc.Channel, page_size: int) -> None:
    data = make_data(30, NUM_CLASSES, seed=10)
    for step in (1, 2, 3):
        s = LockStep(channel)
        s.send(open_request(step=step))
        s.send(chunk_request(0, data))
        s.send(close_request(1))
        s.end()
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    steps, token = [], ""
    while True:
        page = stub.ListEvaluations(
            service_pb2.ListEvaluationsRequest(run="run-1", page_size=page_size, page_token=token)
        )
        assert len(page.evaluations) <= page_size
        steps += [e.key.step for e in page.evaluations]
        assert all(not e.result.imbalance.HasField("per_class") for e in page.evaluations)
        token = page.next_page_token
        if not token:
            break
    assert steps == [3, 2, 1]
    assert not stub.ListEvaluations(service_pb2.ListEvaluationsRequest(model="other")).evaluations
    latest = _get_latest(stub)
    assert latest.key.step == 3


def _get_latest(stub: service_pb2_grpc.EvalStreamServiceStub) -> evaluation_pb2.Evaluation:
    ref = evaluation_pb2.EvaluationRef(run="run-1", model="model-a")
    return stub.GetEvaluation(service_pb2.GetEvaluationRequest(ref=ref)).evaluation
