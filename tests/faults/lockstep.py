"""One StreamEvaluation call driven request by request over a raw stub, so a test sees exactly which
answer (or which final status) belongs to which request."""

from __future__ import annotations

import queue
from collections.abc import Iterator

import grpc

from evalstream.v1 import evaluation_pb2, service_pb2, service_pb2_grpc


def open_request(
    model: str, num_classes: int, rank: int = 0, world_size: int = 1, run: str = "faults", step: int = 0
) -> service_pb2.StreamEvaluationRequest:
    return service_pb2.StreamEvaluationRequest(
        open=service_pb2.OpenShard(
            key=evaluation_pb2.EvaluationKey(run=run, model=model, split="validation", step=step),
            rank=rank,
            world_size=world_size,
            num_classes=num_classes,
        )
    )


def close_request(num_chunks: int) -> service_pb2.StreamEvaluationRequest:
    return service_pb2.StreamEvaluationRequest(close=service_pb2.CloseShard(num_chunks=num_chunks))


class LockStep:
    def __init__(self, channel: grpc.Channel, timeout: float = 60.0) -> None:
        self._requests: queue.SimpleQueue[service_pb2.StreamEvaluationRequest | None] = queue.SimpleQueue()
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        self.call = stub.StreamEvaluation(iter(self._requests.get, None), timeout=timeout)
        self._responses: Iterator[service_pb2.StreamEvaluationResponse] = self.call

    def send(self, request: service_pb2.StreamEvaluationRequest) -> service_pb2.StreamEvaluationResponse:
        self._requests.put(request)
        return next(self._responses)

    def fails(self, request: service_pb2.StreamEvaluationRequest) -> grpc.RpcError:
        """Send a request the server must answer by ending the stream with a status; return it."""
        self._requests.put(request)
        try:
            response = next(self._responses)
        except grpc.RpcError as exc:
            return exc
        raise AssertionError(f"expected the stream to end with a status, got {response}")

    def end(self) -> None:
        self._requests.put(None)

    def cancel(self) -> None:
        self._requests.put(None)
        self.call.cancel()
