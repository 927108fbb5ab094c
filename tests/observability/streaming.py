"""Streaming one shard of an evaluation over the raw gRPC stubs, and the numbers to expect."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from evalstream.v1 import evaluation_pb2, service_pb2, service_pb2_grpc
from evalstream.wire import encode_tensor


@dataclass(frozen=True)
class Data:
    """Logits and labels of one shard, with the NLL / accuracy a correct engine must report."""

    scores: npt.NDArray[np.float32]
    labels: npt.NDArray[np.int64]

    @property
    def nll_per_sample(self) -> npt.NDArray[np.float64]:
        x = self.scores.astype(np.float64)
        m = x.max(axis=1, keepdims=True)
        logz = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
        return np.asarray(logz - x[np.arange(len(x)), self.labels])

    @property
    def nll(self) -> float:
        return float(self.nll_per_sample.mean())

    @property
    def correct(self) -> int:
        return int((self.scores.argmax(axis=1) == self.labels).sum())

    @property
    def accuracy(self) -> float:
        return self.correct / len(self.labels)


def make_data(seed: int, n: int, num_classes: int, strength: float, scale: float = 1.0) -> Data:
    """Zipf-distributed labels (imbalanced) and logits that favour the label by ``strength``."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, num_classes + 1) ** 1.1
    labels = rng.choice(num_classes, size=n, p=p / p.sum()).astype(np.int64)
    scores = rng.standard_normal((n, num_classes)).astype(np.float32)
    scores[np.arange(n), labels] += rng.uniform(0, 2 * strength, size=n).astype(np.float32)
    return Data((scores * scale).astype(np.float32), labels)


def chunk(
    seq: int, scores: npt.NDArray[np.float32], labels: npt.NDArray[np.int64], first_id: int
) -> service_pb2.StreamEvaluationRequest:
    ids = np.arange(first_id, first_id + len(labels), dtype=np.int64)
    return service_pb2.StreamEvaluationRequest(
        chunk=service_pb2.Chunk(
            sequence=seq,
            scores=encode_tensor(scores),
            labels=encode_tensor(labels),
            sample_ids=encode_tensor(ids),
        )
    )


def stream_shard(
    stub: service_pb2_grpc.EvalStreamServiceStub,
    key: evaluation_pb2.EvaluationKey,
    data: Data,
    *,
    rank: int = 0,
    world_size: int = 1,
    rows: int = 200,
    resend_first: bool = False,
    bad_label_chunk: bool = False,
) -> list[service_pb2.StreamEvaluationResponse]:
    """Open, send every chunk (optionally a retry and a chunk with an out-of-range label), close."""
    num_classes = data.scores.shape[1]

    def requests() -> Iterator[service_pb2.StreamEvaluationRequest]:
        yield service_pb2.StreamEvaluationRequest(
            open=service_pb2.OpenShard(key=key, rank=rank, world_size=world_size, num_classes=num_classes)
        )
        seq = 0
        base = rank * 1_000_000
        for start in range(0, len(data.labels), rows):
            yield chunk(
                seq, data.scores[start : start + rows], data.labels[start : start + rows], base + start
            )
            if resend_first and seq == 0:
                yield chunk(0, data.scores[:rows], data.labels[:rows], base)
            seq += 1
        if bad_label_chunk:
            bad = np.full(2, num_classes + 5, dtype=np.int64)
            yield chunk(seq, data.scores[:2], bad, base + 999_000)
            seq += 1
        yield service_pb2.StreamEvaluationRequest(close=service_pb2.CloseShard(num_chunks=seq))

    return list(stub.StreamEvaluation(requests(), timeout=120))
