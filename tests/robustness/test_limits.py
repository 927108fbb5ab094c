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

from evalstream.service.settings import Settings
from evalstream.service.staging import MAX_BLOCKS, STAGING_BYTES
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


# The roomy server's memory settings, from which the flood test derives its bound.
ROOMY_MESSAGE_BYTES = 2 * MIB
ROOMY_WINDOW_BYTES = 256 * 1024
# What no setting bounds and the design does not promise to a byte: the engine's scratch buffers for
# C=3,000, allocator arenas of the worker and store threads, SQLite's page cache, the finalize of
# each flood's evaluation. Measured 65 MiB at most over 930 chunks on 2 cores kept busy by
# ../shared/tools/busy; twice that leaves room, and stays far below one flood (576 MB).
ALLOWANCE_BYTES = 128 * MIB


@pytest.fixture(scope="module")
def roomy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """Default limits but a 2 MiB message cap and a fixed HTTP/2 window: for the memory checks.

    The fixed window bounds what gRPC buffers for a stream (gRPC's default window grows with
    measured bandwidth, and how far depends on scheduling), so the bound below is all settings.
    """
    srv = ServerProcess(
        tmp_path_factory.mktemp("roomy"),
        max_message_bytes=ROOMY_MESSAGE_BYTES,
        grpc_stream_window_bytes=ROOMY_WINDOW_BYTES,
    )
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
    """One stream's server memory is bounded by its settings, not by what it sends.

    The design promises that a stream holds at most ``MAX_BLOCKS`` staging blocks, and gRPC at
    most one message being received plus the fixed window; everything else is the stated
    allowance. After a short first stream (the engine's buffers, the first blocks), four floods
    (1.5 GB of scores) may raise the peak RSS by no more than that bound, which does not depend
    on how the machine schedules the server: a server that buffered what it is sent would exceed
    it in the first flood.
    """
    assert _flood(roomy.target, "flood-first", 30) == 30 * ROWS
    first = roomy.peak_rss()
    block = min(STAGING_BYTES, Settings.load(roomy.config, env={}).max_staging_bytes // MAX_BLOCKS)
    bound = MAX_BLOCKS * block + ROOMY_MESSAGE_BYTES + ROOMY_WINDOW_BYTES + ALLOWANCE_BYTES
    peaks = []
    for i, chunks in enumerate((300, 300, 300, 600)):  # 576 MB of scores in the last stream alone
        assert _flood(roomy.target, f"flood-{i}", chunks) == chunks * ROWS
        peaks.append(roomy.peak_rss() - first)
    print(f"peak RSS above the first stream after each flood: {[round(p / MIB) for p in peaks]} MiB")
    assert max(peaks) <= bound, (
        f"floods raised peak RSS by {max(peaks) / MIB:.0f} MiB (after each: "
        f"{[round(p / MIB) for p in peaks]}), over the {bound / MIB:.0f} MiB the settings allow"
    )


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
