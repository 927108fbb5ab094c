"""Every malformed request gets a specific status (or in-band reason) and message, and the evaluation
it targeted is unchanged: same samples, and finishing it with good data gives the engine's result
on the good data alone. One real server on loopback for the module (``conftest.server``)."""

from __future__ import annotations

import itertools

import grpc
import pytest

from evalstream.service.convert import result_from_report
from evalstream.service.engine import Records
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer
from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from evalstream.v1 import evaluation_pb2, service_pb2, service_pb2_grpc
from tests.robustness.cases import CHUNK_CASES, OPEN_CASES, STREAM_CASES, ChunkCase, OpenCase, StreamCase
from tests.robustness.conftest import NUM_CLASSES
from tests.robustness.rawstream import get_evaluation, good_batch
from tests.support.lockstep import LockStep, chunk_request, close_request, open_request

ROWS = 8
_models = itertools.count()


def _model(prefix: str) -> str:
    return f"{prefix}-{next(_models)}"


def _expected(settings: Settings, batches: list) -> evaluation_pb2.EvaluationResult:
    config = settings.engine_config()
    reducer = ChunkReducer(NUM_CLASSES, config)
    records = Records.concat([reducer.reduce(s, y) for s, y in batches])
    return result_from_report(compute_metrics(records, NUM_CLASSES, config))


def _finish(channel: grpc.Channel, model: str, settings: Settings, good: list, world_size: int = 1) -> None:
    """Reopen every rank, add one more good chunk to rank 0, close all: the result is the good data's."""
    extra = good_batch(ROWS, NUM_CLASSES, seed=99)
    for rank in range(world_size):
        s = LockStep(channel)
        opened = s.send(open_request(model, NUM_CLASSES, rank=rank, world_size=world_size)).opened
        seq = opened.next_sequence
        if rank == 0:
            assert s.send(chunk_request(seq, *extra)).ack.next_sequence == seq + 1
            seq += 1
        s.send(close_request(seq))
        s.end()
    evaluation = get_evaluation(channel, model)
    assert evaluation.state == evaluation_pb2.EVALUATION_STATE_FINALIZED
    assert evaluation.result == _expected(settings, [*good, extra])


@pytest.mark.parametrize("case", CHUNK_CASES, ids=lambda c: c.name)
def test_bad_chunk_is_rejected_in_band_and_changes_nothing(
    server: BackgroundServer, settings: Settings, case: ChunkCase
) -> None:
    model = _model("chunk")
    good = [good_batch(ROWS, NUM_CLASSES, seed=1)]
    with grpc.insecure_channel(server.target) as channel:
        s = LockStep(channel)
        s.send(open_request(model, NUM_CLASSES))
        s.send(chunk_request(0, *good[0]))
        ack = s.send(case.build(1, good_batch(ROWS, NUM_CLASSES, seed=2))).ack
        assert ack.HasField("rejection"), f"{case.name} was accepted"
        r = ack.rejection
        assert (r.reason, r.code, r.sequence) == (case.reason, case.code, 1), r
        assert len(r.message) > 10
        assert (ack.next_sequence, ack.samples_committed) == (2, ROWS)
        # The stream goes on: a retry of the refused chunk hears the same answer, the next one commits.
        again = s.send(case.build(1, good_batch(ROWS, NUM_CLASSES, seed=2))).ack
        assert again.duplicate and again.rejection.reason == case.reason
        assert get_evaluation(channel, model).num_samples == ROWS
        s.send(close_request(2))
        s.end()
        evaluation = get_evaluation(channel, model)
        assert evaluation.result == _expected(settings, good)


@pytest.mark.parametrize("case", STREAM_CASES, ids=lambda c: c.name)
def test_bad_stream_request_ends_the_stream_with_a_specific_status(
    server: BackgroundServer, settings: Settings, case: StreamCase
) -> None:
    model = _model("stream")
    good = [good_batch(ROWS, NUM_CLASSES, seed=3)]
    world = 2 if case.closed_first else 1
    with grpc.insecure_channel(server.target) as channel:
        # The evaluation the bad request targets: one committed chunk on rank 0.
        s = LockStep(channel)
        s.send(open_request(model, NUM_CLASSES, world_size=world))
        s.send(chunk_request(0, *good[0]))
        if case.closed_first:
            assert s.send(close_request(1)).closed.ranks_closed == 1
        if not case.opened:
            s.end()
            s = LockStep(channel)
        error = s.fails(case.build(1, good_batch(ROWS, NUM_CLASSES, seed=4)))
        assert error.code() == case.code, (error.code(), error.details())
        assert case.words in (error.details() or ""), error.details()
        evaluation = get_evaluation(channel, model)
        assert (evaluation.num_samples, evaluation.state) == (ROWS, evaluation_pb2.EVALUATION_STATE_OPEN)
        if case.closed_first:
            s = LockStep(channel)
            s.send(open_request(model, NUM_CLASSES, rank=1, world_size=2))
            s.send(close_request(0))
            s.end()
            assert get_evaluation(channel, model).result == _expected(settings, good)
        else:
            _finish(channel, model, settings, good)


@pytest.mark.parametrize("case", OPEN_CASES, ids=lambda c: c.name)
def test_bad_open_is_refused_and_creates_nothing(
    server: BackgroundServer, settings: Settings, case: OpenCase
) -> None:
    model = _model("open")
    good = [good_batch(ROWS, NUM_CLASSES, seed=5)]
    with grpc.insecure_channel(server.target) as channel:
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        s = LockStep(channel)
        s.send(open_request(model, NUM_CLASSES, world_size=2))
        s.send(chunk_request(0, *good[0]))
        s.end()
        before = len(stub.ListEvaluations(service_pb2.ListEvaluationsRequest(page_size=1000)).evaluations)
        error = LockStep(channel).fails(case.build(model))
        assert error.code() == case.code, (error.code(), error.details())
        assert case.words in (error.details() or ""), error.details()
        after = len(stub.ListEvaluations(service_pb2.ListEvaluationsRequest(page_size=1000)).evaluations)
        assert after == before, "a refused open created an evaluation"
        evaluation = get_evaluation(channel, model)
        assert (evaluation.num_samples, evaluation.world_size, evaluation.ranks_closed) == (ROWS, 2, 0)
        _finish(channel, model, settings, good, world_size=2)


def test_every_reason_in_the_table_is_distinct_per_problem() -> None:
    """The table covers each in-band reason the decoder and engine produce for malformed chunks."""
    reasons = {c.reason for c in CHUNK_CASES}
    assert reasons >= {
        "dtype_unspecified",
        "bad_dtype",
        "byte_length_mismatch",
        "bad_shape",
        "chunk_too_large",
        "shape_mismatch",
        "label_count_mismatch",
        "label_out_of_range",
        "non_finite",
        "sample_id_negative",
    }
