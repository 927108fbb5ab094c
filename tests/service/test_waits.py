"""GetEvaluation long polls on one server (SQLite): a waiter is woken by the finalize, not by polling.

A real server on loopback and real streams: rank 0 closes, a GetEvaluation with ``wait`` is
held, rank 1 closes and finalizes, and that one call answers with the finalized evaluation.
How each wait ended is read from the server's own counter (``evalstream_waits_total``), so
the tests assert outcomes, never latencies.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from evalstream.client import EvalClient, EvaluationTimeout
from evalstream.service.server import BackgroundServer
from evalstream.v1 import evaluation_pb2, service_pb2, service_pb2_grpc
from tests.service.conftest import NUM_CLASSES, small_settings
from tests.service.helpers import MODEL, RUN, SPLIT, make_data, stream_shard

PATIENCE_S = 60.0  # how long a test waits for something that takes well under a second when idle


@pytest.fixture
def waiting_server(tmp_path: Path) -> Iterator[BackgroundServer]:
    """A server of its own, so its wait counters start at zero."""
    with BackgroundServer(small_settings(tmp_path / "data", max_wait_s=PATIENCE_S)) as srv:
        yield srv


def waits(server: BackgroundServer) -> dict[str, float]:
    """The server's ``evalstream_waits_total`` by outcome."""
    assert server.server is not None
    registry = server.server.telemetry.registry
    return {
        outcome: registry.get_sample_value("evalstream_waits_total", {"outcome": outcome}) or 0.0
        for outcome in ("notified", "polled", "timeout")
    }


def waiting(server: BackgroundServer) -> int:
    assert server.server is not None
    return server.server.coordinator.waiters.waiting()


def until(what: str, check: Callable[[], bool], timeout: float = PATIENCE_S) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def get_request(step: int = 0, wait_s: float = 0.0) -> service_pb2.GetEvaluationRequest:
    request = service_pb2.GetEvaluationRequest(
        ref=evaluation_pb2.EvaluationRef(run=RUN, model=MODEL, split=SPLIT, step=step)
    )
    if wait_s:
        request.wait.FromNanoseconds(int(wait_s * 1e9))
    return request


def test_a_long_poll_answers_when_another_rank_finalizes(waiting_server: BackgroundServer) -> None:
    data = [make_data(40, NUM_CLASSES, seed=r, id_offset=100 * r) for r in range(2)]
    with grpc.insecure_channel(waiting_server.target) as channel, ThreadPoolExecutor(1) as pool:
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        stream_shard(channel, 0, 2, data[0], 20, NUM_CLASSES)
        held: Future[service_pb2.GetEvaluationResponse] = pool.submit(
            stub.GetEvaluation, get_request(wait_s=PATIENCE_S), timeout=PATIENCE_S + 30
        )
        until("the long poll to be waiting", lambda: waiting(waiting_server) == 1)
        assert not held.done()
        stream_shard(channel, 1, 2, data[1], 20, NUM_CLASSES)  # the last close finalizes
        answer = held.result(timeout=PATIENCE_S).evaluation
    assert answer.state == evaluation_pb2.EVALUATION_STATE_FINALIZED
    assert answer.result.num_samples == 80
    # One call, ended by the finalizer's announcement: no polling on either side.
    assert waits(waiting_server) == {"notified": 1.0, "polled": 0.0, "timeout": 0.0}
    assert waiting(waiting_server) == 0


def test_a_wait_that_elapses_answers_the_open_evaluation(tmp_path: Path) -> None:
    settings = small_settings(tmp_path / "data", max_wait_s=0.3)
    with BackgroundServer(settings) as server, grpc.insecure_channel(server.target) as channel:
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        stream_shard(channel, 0, 2, make_data(20, NUM_CLASSES), 20, NUM_CLASSES)
        # Asks for a minute; the server's max_wait_s cuts it, and the answer is not an error.
        answer = stub.GetEvaluation(get_request(wait_s=PATIENCE_S), timeout=PATIENCE_S).evaluation
        assert answer.state == evaluation_pb2.EVALUATION_STATE_OPEN
        assert answer.ranks_closed == 1
        assert waits(server) == {"notified": 0.0, "polled": 0.0, "timeout": 1.0}

        with pytest.raises(grpc.RpcError) as refused:
            stub.GetEvaluation(get_request(wait_s=-1.0), timeout=PATIENCE_S)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "wait must not be negative" in (refused.value.details() or "")


def test_the_client_keeps_waiting_past_the_servers_cap(tmp_path: Path) -> None:
    """wait_for asks again while its own timeout lasts: several capped long polls, then the result."""
    data = [make_data(30, NUM_CLASSES, seed=r, id_offset=100 * r) for r in range(2)]
    server = BackgroundServer(small_settings(tmp_path / "data", max_wait_s=0.2)).start()
    try:
        with grpc.insecure_channel(server.target) as channel, EvalClient(server.target) as client:
            stream_shard(channel, 0, 2, data[0], 30, NUM_CLASSES)
            with pytest.raises(EvaluationTimeout, match=r"1/2 ranks closed"):
                client.wait_for(RUN, MODEL, split=SPLIT, timeout=1.0)
            assert waits(server)["timeout"] >= 2  # it did not give up at the server's first answer

            closer = threading.Timer(0.5, stream_shard, (channel, 1, 2, data[1], 30, NUM_CLASSES))
            closer.start()
            try:
                done = client.wait_for(RUN, MODEL, split=SPLIT, timeout=PATIENCE_S)
            finally:
                closer.join()
    finally:
        server.stop(grace=0.5)
    assert done.state == evaluation_pb2.EVALUATION_STATE_FINALIZED
    assert done.result.num_samples == 60
    # Woken by the finalize, or (closed between two capped polls) answered by the next one at once.
    assert waits(server)["notified"] + waits(server)["polled"] <= 1


def test_result_is_one_long_poll_when_the_other_rank_closes_later(waiting_server: BackgroundServer) -> None:
    """EvaluationStream.result() through EvalClient: woken by the finalize, one wait, nothing polled."""
    mine, theirs = make_data(30, NUM_CLASSES, seed=4), make_data(30, NUM_CLASSES, seed=5, id_offset=1000)
    with grpc.insecure_channel(waiting_server.target) as channel, EvalClient(waiting_server.target) as client:
        with client.evaluation(
            run=RUN, model=MODEL, split=SPLIT, rank=0, world_size=2, num_classes=NUM_CLASSES
        ) as ev:
            ev.add(mine.scores, mine.labels, sample_ids=mine.ids)

        def close_the_other_rank() -> None:
            until("result() to wait", lambda: waiting(waiting_server) == 1)
            stream_shard(channel, 1, 2, theirs, 30, NUM_CLASSES)

        closer = threading.Thread(target=close_the_other_rank)
        closer.start()
        try:
            done = ev.result(timeout=PATIENCE_S)
        finally:
            closer.join()
    assert done.state == evaluation_pb2.EVALUATION_STATE_FINALIZED
    assert waits(waiting_server) == {"notified": 1.0, "polled": 0.0, "timeout": 0.0}


def test_a_long_poll_ends_when_the_server_stops(tmp_path: Path) -> None:
    """Shutdown answers a held long poll with the open evaluation at once (its client asks elsewhere)."""
    server = BackgroundServer(small_settings(tmp_path / "data", max_wait_s=PATIENCE_S)).start()
    try:
        with grpc.insecure_channel(server.target) as channel, ThreadPoolExecutor(1) as pool:
            stub = service_pb2_grpc.EvalStreamServiceStub(channel)
            stream_shard(channel, 0, 2, make_data(20, NUM_CLASSES), 20, NUM_CLASSES)
            held = pool.submit(stub.GetEvaluation, get_request(wait_s=PATIENCE_S), timeout=PATIENCE_S + 30)
            until("the long poll to be waiting", lambda: waiting(server) == 1)
            server.stop(grace=PATIENCE_S)  # returns only once every call ended
            answer = held.result(timeout=5).evaluation
    finally:
        server.stop()
    assert answer.state == evaluation_pb2.EVALUATION_STATE_OPEN
