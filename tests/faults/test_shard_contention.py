"""Two (or more) streams try to hold the same shard at once: one wins, the others hear ABORTED with
a message that says why, and nothing is counted twice.

Contenders are copies of the same rank (a zombie job and its replacement) with
the same data. They race to open; the winner resumes from the server's
``next_sequence``, sends a seeded number of chunks and then either dies
(cancels its call mid-stream) or closes the shard; losers retry. The finalized
result must be the engine's on one copy of the data.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field

import grpc
import pytest

from evalstream.service.settings import Settings
from evalstream.v1 import evaluation_pb2, service_pb2, service_pb2_grpc
from tests.faults.conftest import FaultLog
from tests.faults.harness import ServerProcess
from tests.faults.naive import chunk_requests
from tests.faults.workload import assert_same_result, fetch_result, rank_batches, reference

NUM_CLASSES = 50
BATCHES = 16
ROWS = 30
CONTENDERS = 4


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    wins: int = 0
    aborted: int = 0
    deaths: int = 0
    closed_by: list[int] = field(default_factory=list)
    other: list[str] = field(default_factory=list)
    holders: int = 0  # streams holding the shard right now
    max_holders: int = 0


def _contender(
    who: int, target: str, model: str, seed: int, start: threading.Barrier, tally: Tally, deadline: float
) -> None:
    rng = random.Random(seed * 100 + who)
    chunks = chunk_requests(rank_batches(0, BATCHES, ROWS, NUM_CLASSES, seed))
    open_msg = service_pb2.OpenShard(
        key=evaluation_pb2.EvaluationKey(run="faults", model=model, split="validation", step=0),
        rank=0,
        world_size=1,
        num_classes=NUM_CLASSES,
    )
    start.wait()
    with grpc.insecure_channel(target) as channel:
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        while time.monotonic() < deadline:
            requests: queue.SimpleQueue[service_pb2.StreamEvaluationRequest | None] = queue.SimpleQueue()
            requests.put(service_pb2.StreamEvaluationRequest(open=open_msg))
            call = stub.StreamEvaluation(iter(requests.get, None))
            try:
                opened = next(call).opened
            except grpc.RpcError as exc:
                with tally.lock:
                    if exc.code() == grpc.StatusCode.ABORTED and "held by another" in (exc.details() or ""):
                        tally.aborted += 1
                    else:
                        tally.other.append(f"{exc.code()}: {exc.details()}")
                time.sleep(rng.uniform(0.0, 0.05))
                continue
            if opened.already_closed:
                requests.put(None)
                call.cancel()
                return
            with tally.lock:
                tally.wins += 1
                tally.holders += 1
                tally.max_holders = max(tally.max_holders, tally.holders)
            seq = opened.next_sequence
            dies = rng.random() < 0.6
            stop = rng.randint(seq, len(chunks)) if dies else len(chunks)
            try:
                while seq < stop:
                    requests.put(chunks[seq])
                    ack = next(call).ack
                    assert not ack.duplicate and ack.next_sequence == seq + 1, ack
                    seq += 1
                if dies:
                    with tally.lock:
                        tally.deaths += 1
                        tally.holders -= 1
                    if rng.random() < 0.5:
                        requests.put(chunks[seq] if seq < len(chunks) else None)  # dies mid-chunk
                    call.cancel()
                    continue
                requests.put(
                    service_pb2.StreamEvaluationRequest(close=service_pb2.CloseShard(num_chunks=seq))
                )
                summary = next(call).closed
                with tally.lock:
                    tally.holders -= 1
                    tally.closed_by.append(who)
                assert summary.samples == BATCHES * ROWS and summary.finalized, summary
                requests.put(None)
                return
            except grpc.RpcError as exc:
                with tally.lock:
                    tally.other.append(f"winner failed: {exc.code()}: {exc.details()}")
                return
    with tally.lock:
        tally.other.append(f"contender {who} ran out of time")


def _scenario(server: ServerProcess, seed: int) -> Tally:
    model = f"contention-{seed}"
    tally = Tally()
    barrier = threading.Barrier(CONTENDERS)
    deadline = time.monotonic() + 120
    threads = [
        threading.Thread(target=_contender, args=(i, server.target, model, seed, barrier, tally, deadline))
        for i in range(CONTENDERS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=150)
    assert not tally.other, tally.other
    assert len(tally.closed_by) == 1, tally
    assert tally.max_holders == 1, "two streams held the shard at once"
    assert tally.aborted >= CONTENDERS - 1, "the first race must turn every loser away"
    evaluation = fetch_result(server.target, model)
    config = Settings.load(server.config, env={}).engine_config()
    data = [rank_batches(0, BATCHES, ROWS, NUM_CLASSES, seed)]
    assert evaluation.result.num_samples == BATCHES * ROWS
    assert_same_result(evaluation.result, reference(data, NUM_CLASSES, config))
    return tally


def _faults(tally: Tally) -> list[str]:
    return [f"{tally.aborted} opens turned away"] + [f"holder died ({i + 1})" for i in range(tally.deaths)]


@pytest.mark.parametrize("seed", range(3))
def test_one_stream_holds_a_shard_and_the_others_are_aborted(
    server: ServerProcess, seed: int, fault_log: FaultLog
) -> None:
    fault_log.record("same shard from several streams", _faults(_scenario(server, seed)))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3, 20))
def test_shard_contention_many_seeds(server: ServerProcess, seed: int, fault_log: FaultLog) -> None:
    fault_log.record("same shard from several streams", _faults(_scenario(server, seed)))
