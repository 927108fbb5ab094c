"""Resource limits hold on a real server process: past a limit the status is RESOURCE_EXHAUSTED, and
the server's memory stays bounded (peak RSS, VmHWM, read from /proc) however much is sent.

Limits: ``max_message_bytes`` (gRPC's own check, the stream ends), ``max_open_shards`` and
``max_open_shards_per_connection`` (the open is refused), ``max_samples_per_evaluation`` (the chunk
is refused in-band). Bytes buffered per stream have no setting: a stream holds at most two staging
blocks and a bounded pipeline, which the flood test checks by streaming far more than that.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import numpy as np
import pytest

from evalstream.v1 import service_pb2
from tests.faults.harness import ServerProcess
from tests.robustness.rawstream import get_evaluation, good_batch
from tests.support.lockstep import LockStep, chunk_request, close_request, open_request

MIB = 1 << 20
C = 3000
ROWS = 80  # 960 KB of float32 scores a chunk


def _separate_connection(target: str) -> grpc.Channel:
    """A channel with its own TCP connection (channels in one process share them by default)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    srv = ServerProcess(
        tmp_path_factory.mktemp("limits"),
        max_message_bytes=2 * MIB,
        max_open_shards=6,
        max_open_shards_per_connection=3,
        max_samples_per_evaluation=500,
    )
    srv.start()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Default limits but a 2 MiB message cap: for the memory checks."""
    srv = ServerProcess(tmp_path_factory.mktemp("roomy"), max_message_bytes=2 * MIB)
    srv.start()
    yield srv
    srv.close()


def _opened_or_error(
    channel: grpc.Channel, model: str, rank: int, world: int
) -> tuple[LockStep, grpc.RpcError | None]:
    s = LockStep(channel)
    try:
        s.send(open_request(model, 10, rank=rank, world_size=world))
        return s, None
    except grpc.RpcError as exc:
        return s, exc


def test_open_shards_per_connection_and_per_server(server: ServerProcess) -> None:
    with _separate_connection(server.target) as a, _separate_connection(server.target) as b:
        held = [_opened_or_error(a, "conn", r, 16)[0] for r in range(3)]
        _, error = _opened_or_error(a, "conn", 3, 16)
        assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_open_shards_per_connection=3" in (error.details() or "")
        held += [_opened_or_error(b, "conn", r, 16)[0] for r in range(3, 6)]  # another connection: fine
        with _separate_connection(server.target) as c:
            _, error = _opened_or_error(c, "conn", 6, 16)
            assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "max_open_shards=6" in (error.details() or "")
            held[0].end()  # one stream ends: its slot frees up
            for _ in range(100):
                s, error = _opened_or_error(c, "conn", 6, 16)
                if error is None:
                    s.end()
                    break
                time.sleep(0.05)
            assert error is None, error
        for s in held[1:]:
            s.end()


def test_samples_per_evaluation(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        s = LockStep(channel)
        s.send(open_request("cap", 10))
        committed = 0
        for seq in range(8):
            ack = s.send(chunk_request(seq, *good_batch(64, 10, seed=seq))).ack
            if ack.HasField("rejection"):
                r = ack.rejection
                assert (r.code, r.reason) == ("RESOURCE_EXHAUSTED", "evaluation_too_large"), r
                assert "max_samples_per_evaluation=500" in r.message
            else:
                committed += 64
            assert ack.samples_committed == committed <= 500
        assert committed == 448
        assert s.send(close_request(8)).closed.samples == 448
        s.end()
        assert get_evaluation(channel, "cap").result.num_samples == 448


def _chunk_bytes(seq: int, payload: service_pb2.Chunk) -> bytes:
    payload.sequence = seq
    return service_pb2.StreamEvaluationRequest(chunk=payload).SerializeToString()


def _flood(target: str, model: str, chunks: int) -> int:
    """Send ``chunks`` 960 KB chunks as fast as gRPC takes them, reading acks only at the end."""
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(ROWS, C)).astype(np.float32)
    labels = rng.integers(0, C, ROWS).astype(np.int64)
    payload = chunk_request(0, scores, labels).chunk
    with grpc.insecure_channel(target, options=[("grpc.max_send_message_length", 4 * MIB)]) as channel:
        call = channel.stream_stream(
            "/evalstream.v1.EvalStreamService/StreamEvaluation",
            request_serializer=None,
            response_deserializer=service_pb2.StreamEvaluationResponse.FromString,
        )

        def requests() -> Iterator[bytes]:
            yield open_request(model, C).SerializeToString()
            for seq in range(chunks):
                yield _chunk_bytes(seq, payload)
            yield close_request(chunks).SerializeToString()

        summary = [r.closed for r in call(requests(), timeout=300) if r.WhichOneof("message") == "closed"]
    return summary[0].samples


def test_memory_stays_bounded_however_much_one_stream_sends(roomy: ServerProcess) -> None:
    """Peak RSS settles (allocator arenas, staging blocks, gRPC buffers) within a few hundred chunks;
    a stream twice as long as all the warm-up together then adds (next to) nothing."""
    base = roomy.peak_rss()
    assert _flood(roomy.target, "flood-warm-1", 30) == 30 * ROWS
    assert _flood(roomy.target, "flood-warm-2", 300) == 300 * ROWS
    warm = roomy.peak_rss()
    assert _flood(roomy.target, "flood", 600) == 600 * ROWS  # 576 MB of scores in one stream
    after = roomy.peak_rss()
    print(
        f"peak RSS: start {base / MIB:.0f} MiB, warm {warm / MIB:.0f} MiB, after 576 MB {after / MIB:.0f} MiB"
    )
    assert after - warm < 64 * MIB, f"a 576 MB stream raised peak RSS by {(after - warm) / MIB:.0f} MiB"
    assert warm - base < 256 * MIB, f"streaming took {(warm - base) / MIB:.0f} MiB"


def test_messages_over_the_limit_end_the_stream_without_growing_memory(roomy: ServerProcess) -> None:
    before = roomy.peak_rss()
    big = chunk_request(0, np.zeros((2 * MIB // (4 * 10) + 64, 10), np.float32), np.zeros(10, np.int64))
    for i in range(10):
        with grpc.insecure_channel(
            roomy.target, options=[("grpc.max_send_message_length", 8 * MIB)]
        ) as channel:
            s = LockStep(channel)
            s.send(open_request(f"huge-{i}", 10))
            error = s.fails(big)
            assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error
    grown = roomy.peak_rss() - before
    assert grown < 64 * MIB, f"peak RSS grew by {grown / MIB:.0f} MiB refusing oversized messages"
