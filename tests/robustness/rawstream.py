"""A StreamEvaluation call fed raw bytes, one request at a time, so tests can send what no
well-behaved client would: corrupt protobuf, unknown fields, invalid UTF-8."""

from __future__ import annotations

import queue
from typing import Any

import grpc
import numpy as np

from evalstream.service.wire import encode_tensor
from evalstream.v1 import evaluation_pb2, service_pb2, service_pb2_grpc

METHOD = "/evalstream.v1.EvalStreamService/StreamEvaluation"
Request = service_pb2.StreamEvaluationRequest


def as_bytes(request: Request | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


class RawStream:
    def __init__(self, channel: grpc.Channel, timeout: float = 60.0) -> None:
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        call = channel.stream_stream(
            METHOD,
            request_serializer=None,
            response_deserializer=service_pb2.StreamEvaluationResponse.FromString,
        )
        self._responses: Any = call(iter(self._requests.get, None), timeout=timeout)

    def send(self, request: Request | bytes) -> service_pb2.StreamEvaluationResponse:
        self._requests.put(as_bytes(request))
        return next(self._responses)

    def fails(self, request: Request | bytes) -> grpc.RpcError:
        self._requests.put(as_bytes(request))
        try:
            response = next(self._responses)
        except grpc.RpcError as exc:
            return exc
        raise AssertionError(f"expected the stream to end with a status, got {response}")

    def end(self) -> None:
        self._requests.put(None)


def open_request(
    model: str,
    num_classes: int,
    rank: int = 0,
    world_size: int = 1,
    run: str = "robust",
    split: str = "validation",
    step: int = 0,
) -> Request:
    return Request(
        open=service_pb2.OpenShard(
            key=evaluation_pb2.EvaluationKey(run=run, model=model, split=split, step=step),
            rank=rank,
            world_size=world_size,
            num_classes=num_classes,
        )
    )


def chunk_request(
    sequence: int, scores: np.ndarray, labels: np.ndarray, ids: np.ndarray | None = None
) -> Request:
    chunk = service_pb2.Chunk(sequence=sequence, scores=encode_tensor(scores), labels=encode_tensor(labels))
    if ids is not None:
        chunk.sample_ids.CopyFrom(encode_tensor(ids))
    return Request(chunk=chunk)


def close_request(num_chunks: int) -> Request:
    return Request(close=service_pb2.CloseShard(num_chunks=num_chunks))


def good_batch(rows: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=rows).astype(np.int64)
    scores = rng.normal(size=(rows, num_classes)).astype(np.float32)
    scores[np.arange(rows), labels] += 1.5
    return scores, labels


def get_evaluation(channel: grpc.Channel, model: str, run: str = "robust") -> evaluation_pb2.Evaluation:
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    ref = evaluation_pb2.EvaluationRef(run=run, model=model, split="validation", step=0)
    request = service_pb2.GetEvaluationRequest(ref=ref, include_per_class=True)
    return stub.GetEvaluation(request, timeout=30).evaluation
