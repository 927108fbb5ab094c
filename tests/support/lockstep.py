"""One StreamEvaluation call driven request by request over a raw channel, so a test sees exactly
which answer (or which final status) belongs to which request.

Requests go out as messages or as raw bytes, so a test can also send what no well-behaved client
would: corrupt protobuf, unknown fields, invalid UTF-8.
"""

from __future__ import annotations

import queue
import time
from typing import Any

import grpc
import numpy as np

from evalstream.v1 import evaluation_pb2, service_pb2
from evalstream.wire import encode_tensor

RUN = "lockstep"
METHOD = "/evalstream.v1.EvalStreamService/StreamEvaluation"
Request = service_pb2.StreamEvaluationRequest


def as_bytes(request: Request | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def open_request(
    model: str,
    num_classes: int,
    rank: int = 0,
    world_size: int = 1,
    run: str = RUN,
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


class LockStep:
    def __init__(self, channel: grpc.Channel, timeout: float = 60.0) -> None:
        self._requests: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        stub = channel.stream_stream(
            METHOD,
            request_serializer=None,
            response_deserializer=service_pb2.StreamEvaluationResponse.FromString,
        )
        self.call: Any = stub(iter(self._requests.get, None), timeout=timeout)

    def post(self, request: Request | bytes) -> None:
        """Send without waiting for the answer."""
        self._requests.put(as_bytes(request))

    def send(self, request: Request | bytes) -> service_pb2.StreamEvaluationResponse:
        self.post(request)
        return next(self.call)

    def fails(self, request: Request | bytes) -> grpc.RpcError:
        """Send a request the server must answer by ending the stream with a status; return it."""
        self.post(request)
        try:
            response = next(self.call)
        except grpc.RpcError as exc:
            return exc
        raise AssertionError(f"expected the stream to end with a status, got {response}")

    def end(self) -> None:
        self._requests.put(None)

    def cancel(self) -> None:
        self._requests.put(None)
        self.call.cancel()


def reopen(
    channel: grpc.Channel, request: Request | bytes, patience_s: float = 30.0
) -> tuple[LockStep, service_pb2.StreamEvaluationResponse]:
    """Open a rank whose previous stream just ended, as the client library does: its lease is
    freed once the server has settled that stream's commits, and an open before that is ABORTED
    ("held by another open stream"), so retry on ABORTED only, for up to ``patience_s``."""
    deadline = time.monotonic() + patience_s
    while True:
        step = LockStep(channel)
        try:
            return step, step.send(request)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.ABORTED or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
