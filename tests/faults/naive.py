"""A deliberately simple rank over raw stubs: after any failure it re-sends every chunk since its own
last acknowledgement, ignoring the server's resume point.

The client library resumes from the server's ``next_sequence`` and so rarely
re-sends a committed chunk; other clients (or this one) may. Under connection
faults this rank re-sends chunks that were committed but whose acknowledgement
was lost, which the server must acknowledge as duplicates and never count again.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import grpc

from evalstream.v1 import evaluation_pb2, service_pb2, service_pb2_grpc
from tests.faults.workload import Batch, RankRun
from tests.support.lockstep import chunk_request

RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED, grpc.StatusCode.CANCELLED)


@dataclass
class NaiveStats:
    attempts: int = 0
    duplicates: int = 0  # acknowledgements that said "already committed"
    resent: int = 0  # chunks sent more than once


def chunk_requests(batches: Sequence[Batch]) -> list[service_pb2.StreamEvaluationRequest]:
    return [chunk_request(seq, s, y) for seq, (s, y) in enumerate(batches)]


def naive_rank(
    target: str,
    run: RankRun,
    stats: NaiveStats,
    *,
    model: str,
    world_size: int,
    batches: Sequence[Batch],
    num_classes: int,
    pace_s: float = 0.0,
    timeout_s: float = 180.0,
) -> None:
    open_msg = service_pb2.OpenShard(
        key=evaluation_pb2.EvaluationKey(run="faults", model=model, split="validation", step=0),
        rank=run.rank,
        world_size=world_size,
        num_classes=num_classes,
        score_kind=evaluation_pb2.SCORE_KIND_LOGITS,
    )
    chunks = chunk_requests(batches)
    close = service_pb2.StreamEvaluationRequest(close=service_pb2.CloseShard(num_chunks=len(chunks)))
    acked = 0
    close_sent = False
    sent_before: set[int] = set()
    deadline = time.monotonic() + timeout_s
    try:
        with grpc.insecure_channel(target) as channel:
            stub = service_pb2_grpc.EvalStreamServiceStub(channel)
            while time.monotonic() < deadline:
                stats.attempts += 1
                start = acked
                stop: queue.SimpleQueue[None] = queue.SimpleQueue()

                def requests(
                    start: int = start, stop: queue.SimpleQueue[None] = stop
                ) -> Iterator[service_pb2.StreamEvaluationRequest]:
                    yield service_pb2.StreamEvaluationRequest(open=open_msg)
                    for seq in range(start, len(chunks)):
                        if seq in sent_before:
                            stats.resent += 1
                        sent_before.add(seq)
                        yield chunks[seq]
                        if pace_s:
                            time.sleep(pace_s)
                    nonlocal close_sent
                    close_sent = True
                    yield close
                    stop.get()  # half-close only once the summary arrived

                call = stub.StreamEvaluation(requests())
                try:
                    for response in call:
                        kind = response.WhichOneof("message")
                        if kind == "ack":
                            acked = max(acked, response.ack.next_sequence)
                            stats.duplicates += int(response.ack.duplicate)
                            if response.ack.HasField("rejection"):
                                raise AssertionError(f"chunk rejected: {response.ack.rejection}")
                        elif kind == "closed":
                            run.summary = response.closed
                            stop.put(None)
                            return
                        elif kind == "opened" and response.opened.already_closed:
                            # Our close committed but its reply was lost with the connection.
                            assert close_sent, "shard closed before this rank closed it"
                            opened = response.opened
                            run.summary = service_pb2.ShardSummary(
                                evaluation_id=opened.evaluation_id,
                                rank=run.rank,
                                chunks=opened.next_sequence,
                                samples=opened.samples_committed,
                            )
                            return
                except grpc.RpcError as exc:
                    if exc.code() not in RETRYABLE:
                        raise
                finally:
                    stop.put(None)
                    call.cancel()
                time.sleep(0.05)
            raise TimeoutError(f"rank {run.rank} did not finish within {timeout_s} s")
    except BaseException as exc:
        run.error = exc
