"""Requests from numpy arrays, a whole shard streamed over the lock-step driver
(tests/support/lockstep.py), and the expected result."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import grpc
import numpy as np

from evalstream.service.convert import result_from_report
from evalstream.service.engine import EngineConfig
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer
from evalstream.v1 import evaluation_pb2, service_pb2
from tests.support import lockstep
from tests.support.lockstep import LockStep, close_request

RUN, MODEL, SPLIT = "run-1", "model-a", "validation"


@dataclass
class Data:
    scores: np.ndarray
    labels: np.ndarray
    ids: np.ndarray

    def part(self, start: int, stop: int) -> Data:
        return Data(self.scores[start:stop], self.labels[start:stop], self.ids[start:stop])

    def __len__(self) -> int:
        return len(self.labels)


def make_data(n: int, num_classes: int, seed: int = 0, id_offset: int = 0) -> Data:
    """Imbalanced labels (Zipf-like) and logits that lean toward the label, so metrics are non-trivial."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_classes + 1)
    labels = rng.choice(num_classes, size=n, p=weights / weights.sum()).astype(np.int64)
    scores = rng.normal(0.0, 1.0, size=(n, num_classes)).astype(np.float32)
    scores[np.arange(n), labels] += rng.normal(2.0, 1.0, size=n).astype(np.float32)
    ids = np.arange(id_offset, id_offset + n, dtype=np.int64)
    return Data(scores, labels, ids)


def key(
    step: int = 0, run: str = RUN, model: str = MODEL, split: str = SPLIT
) -> evaluation_pb2.EvaluationKey:
    return evaluation_pb2.EvaluationKey(run=run, model=model, split=split, step=step)


def open_request(
    rank: int = 0,
    world_size: int = 1,
    num_classes: int = 50,
    step: int = 0,
    model: str = MODEL,
    run: str = RUN,
    pin: bool = False,
) -> service_pb2.StreamEvaluationRequest:
    return service_pb2.StreamEvaluationRequest(
        open=service_pb2.OpenShard(
            key=key(step, run=run, model=model),
            rank=rank,
            world_size=world_size,
            num_classes=num_classes,
            score_kind=evaluation_pb2.SCORE_KIND_LOGITS,
            pin=pin,
        )
    )


def chunk_request(sequence: int, data: Data, with_ids: bool = True) -> service_pb2.StreamEvaluationRequest:
    return lockstep.chunk_request(sequence, data.scores, data.labels, data.ids if with_ids else None)


def stream_shard(
    channel: grpc.Channel, rank: int, world_size: int, data: Data, rows: int, num_classes: int, step: int = 0
) -> service_pb2.ShardSummary:
    """Open, send ``data`` in chunks of ``rows``, close; check every acknowledgement on the way."""
    s = LockStep(channel)
    opened = s.send(open_request(rank, world_size, num_classes, step)).opened
    assert opened.next_sequence == 0
    seq = 0
    for start in range(0, len(data), rows):
        ack = s.send(chunk_request(seq, data.part(start, start + rows))).ack
        assert not ack.HasField("rejection"), ack.rejection
        assert ack.next_sequence == seq + 1
        seq += 1
    summary = s.send(close_request(seq)).closed
    s.end()
    return summary


def run_ranks(channel: grpc.Channel, parts: list[Data], rows: int, num_classes: int, step: int = 0) -> list:
    """Stream every rank's part concurrently, one thread each; returns the summaries by rank."""
    out: list = [None] * len(parts)
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        try:
            out[rank] = stream_shard(channel, rank, len(parts), parts[rank], rows, num_classes, step)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


def expected_result(data: Data, num_classes: int, config: EngineConfig) -> evaluation_pb2.EvaluationResult:
    """What the engine computes on the concatenated data, in one piece."""
    records = ChunkReducer(num_classes, config).reduce(data.scores, data.labels, data.ids)
    return result_from_report(compute_metrics(records, num_classes, config))


def concat(parts: list[Data]) -> Data:
    return Data(
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.labels for p in parts]),
        np.concatenate([p.ids for p in parts]),
    )
