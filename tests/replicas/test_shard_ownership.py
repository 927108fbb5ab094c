"""Across replicas a rank behaves as on one server: one live stream holds it, and a re-sent sequence
is judged by the digest of its input, whichever replica committed it first.

Real replicas (``tests/replicas/cluster.py``) on one private PostgreSQL, driven request by request
(``tests/support/lockstep.py``) so each test sees which status belongs to which open or chunk.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from evalstream.service.settings import Settings
from evalstream.wire import DTYPE_CODES, WireTensor, encode_chunk_request
from tests.faults.workload import assert_same_result, fetch_result, rank_batches, reference
from tests.replicas.cluster import Cluster
from tests.support.lockstep import LockStep, chunk_request, close_request, open_request

CLASSES = 20
RUN = "faults"  # the run fetch_result reads


@pytest.fixture
def cluster(tmp_path: Path, postgres_url: str) -> Iterator[Cluster]:
    # A hold far longer than any test waits: a rank accepted again was released, not expired.
    made = Cluster(tmp_path, postgres_url, shard_lease_s=60.0)
    try:
        made.start()
        yield made
    finally:
        made.close()


def _open(target: str, model: str) -> tuple[grpc.Channel, LockStep]:
    channel = grpc.insecure_channel(target)
    return channel, LockStep(channel, timeout=120)


def _refused_open(target: str, model: str) -> grpc.RpcError:
    channel, s = _open(target, model)
    try:
        return s.fails(open_request(model, CLASSES, run=RUN))
    finally:
        s.cancel()
        channel.close()


def _accepted_within(target: str, model: str, seconds: float) -> tuple[grpc.Channel, LockStep, int]:
    """Open the rank on ``target`` until it is accepted; the stream and its resume point."""
    deadline = time.monotonic() + seconds
    while True:
        channel, s = _open(target, model)
        try:
            opened = s.send(open_request(model, CLASSES, run=RUN)).opened
            return channel, s, opened.next_sequence
        except grpc.RpcError as exc:
            s.cancel()
            channel.close()
            assert exc.code() == grpc.StatusCode.ABORTED, exc
            assert time.monotonic() < deadline, f"rank still held after {seconds} s: {exc.details()}"
            time.sleep(0.1)


def test_a_live_rank_is_refused_on_another_replica_as_on_its_own_until_its_stream_ends(
    cluster: Cluster,
) -> None:
    first_channel, first = _open(cluster.targets[0], "held")
    assert first.send(open_request("held", CLASSES, run=RUN)).opened.next_sequence == 0
    (scores, labels), *_ = rank_batches(0, 1, 16, CLASSES, seed=1)
    assert first.send(chunk_request(0, scores, labels)).ack.next_sequence == 1

    here = _refused_open(cluster.targets[0], "held")  # the one-server behaviour
    for target in cluster.targets[1:]:
        there = _refused_open(target, "held")
        assert there.code() == here.code() == grpc.StatusCode.ABORTED
        assert there.details() == here.details()
    assert f"rank 0 of {RUN}/held/validation@0 is held by another open stream" in (here.details() or "")

    first.end()  # the stream ends without closing the rank: its hold is released
    for _ in first.call:
        pass
    first_channel.close()
    channel, s, resume = _accepted_within(cluster.targets[2], "held", 10.0)
    assert resume == 1
    s.cancel()
    channel.close()


def test_a_killed_replicas_rank_is_accepted_elsewhere_once_its_hold_expires(
    tmp_path: Path, postgres_url: str
) -> None:
    lease_s = 4.0
    cluster = Cluster(tmp_path, postgres_url, n=2, shard_lease_s=lease_s)
    try:
        cluster.start()
        _, first = _open(cluster.targets[0], "killed")
        first.send(open_request("killed", CLASSES, run=RUN))
        (scores, labels), *_ = rank_batches(0, 1, 16, CLASSES, seed=2)
        assert first.send(chunk_request(0, scores, labels)).ack.next_sequence == 1
        cluster.replicas[0].kill()
        killed_at = time.monotonic()
        # The dead replica's hold lives on until it expires...
        assert _refused_open(cluster.targets[1], "killed").code() == grpc.StatusCode.ABORTED
        assert time.monotonic() - killed_at < lease_s / 2  # ...so that refusal was the hold's
        # ...then the rank resumes on the other replica from what was committed.
        channel, s, resume = _accepted_within(cluster.targets[1], "killed", 30.0)
        assert resume == 1
        s.cancel()
        channel.close()
    finally:
        cluster.close()


def _hand_encoded(sequence: int, scores: np.ndarray, labels: np.ndarray) -> bytes:
    return encode_chunk_request(
        sequence,
        WireTensor(DTYPE_CODES[scores.dtype.name], scores),
        WireTensor(DTYPE_CODES[labels.dtype.name], labels),
        None,
    )


def test_a_sequence_replayed_to_another_replica_is_a_duplicate_only_with_the_same_content(
    cluster: Cluster,
) -> None:
    batches = rank_batches(0, 4, 32, CLASSES, seed=3)
    channel, s = _open(cluster.targets[0], "replayed")
    s.send(open_request("replayed", CLASSES, run=RUN))
    for seq, (scores, labels) in enumerate(batches[:3]):  # as the client library encodes them
        assert s.send(_hand_encoded(seq, scores, labels)).ack.next_sequence == seq + 1
    s.end()
    for _ in s.call:
        pass
    channel.close()

    # Replica 1: chunk 1 again through protobuf is the duplicate it is; chunk 2 with other scores is not.
    channel, s, resume = _accepted_within(cluster.targets[1], "replayed", 10.0)
    assert resume == 3
    again = s.send(chunk_request(1, *batches[1])).ack
    assert again.duplicate and again.next_sequence == 3
    scores, labels = batches[2]
    refused = s.fails(chunk_request(2, scores * np.float32(1.5), labels))
    assert refused.code() == grpc.StatusCode.FAILED_PRECONDITION
    details = refused.details() or ""
    assert f"chunk 2 of rank 0 of evaluation {RUN}/replayed/validation@0" in details
    assert "other content" in details and "resend the original chunks from 2" in details
    s.cancel()
    channel.close()

    # Replica 2 finishes the rank; the result is the original data's, on every replica.
    channel, s, resume = _accepted_within(cluster.targets[2], "replayed", 10.0)
    assert resume == 3
    assert s.send(chunk_request(3, *batches[3])).ack.next_sequence == 4
    assert s.send(close_request(4)).closed.finalized
    s.end()
    channel.close()
    want = reference([batches], CLASSES, Settings.load(cluster.replicas[0].config, env={}).engine_config())
    for target in cluster.targets:
        assert_same_result(fetch_result(target, "replayed").result, want)


def test_a_paused_replica_whose_hold_was_taken_over_ends_its_stream_when_it_wakes(
    tmp_path: Path, postgres_url: str
) -> None:
    lease_s = 2.0
    cluster = Cluster(tmp_path, postgres_url, n=2, shard_lease_s=lease_s)
    try:
        cluster.start()
        _, first = _open(cluster.targets[0], "paused")
        first.send(open_request("paused", CLASSES, run=RUN))
        batches = rank_batches(0, 3, 16, CLASSES, seed=4)
        assert first.send(chunk_request(0, *batches[0])).ack.next_sequence == 1
        cluster.replicas[0].signal(signal.SIGSTOP)  # a frozen VM, a long pause: nothing renews
        channel, second, resume = _accepted_within(cluster.targets[1], "paused", 30.0)
        assert resume == 1
        assert second.send(chunk_request(1, *batches[1])).ack.next_sequence == 2
        cluster.replicas[0].signal(signal.SIGCONT)
        time.sleep(lease_s)  # its heartbeat runs and finds the hold taken over
        ended = first.fails(chunk_request(1, *batches[2]))
        assert ended.code() == grpc.StatusCode.ABORTED
        assert "taken over by another stream" in (ended.details() or "")
        assert second.send(chunk_request(2, *batches[2])).ack.next_sequence == 3
        assert second.send(close_request(3)).closed.finalized
        second.end()
        channel.close()
        config = Settings.load(cluster.replicas[1].config, env={}).engine_config()
        got = fetch_result(cluster.targets[1], "paused").result
        assert_same_result(got, reference([batches], CLASSES, config))
    finally:
        cluster.close()
