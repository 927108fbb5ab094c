"""The servicer's handlers come from the service descriptor: every method of the contract is served,
and a failure in any of them reaches the caller as the status errors.py maps it to."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message_factory import GetMessageClass

from evalstream.service.servicer import SERVICE
from evalstream.v1 import service_pb2

UNARY = [m for m in SERVICE.methods if not m.client_streaming and not m.server_streaming]
assert [m.name for m in SERVICE.methods if m not in UNARY] == ["StreamEvaluation"]


@pytest.mark.parametrize("method", UNARY, ids=lambda m: m.name)
def test_every_unary_method_answers_an_empty_request(channel: grpc.Channel, method: MethodDescriptor) -> None:
    """Implemented (never UNIMPLEMENTED); where the empty request is not enough, a mapped status that
    names what is missing, and the call's details never a traceback."""
    request_class = GetMessageClass(method.input_type)
    response_class = GetMessageClass(method.output_type)
    call = channel.unary_unary(
        f"/{SERVICE.full_name}/{method.name}",
        request_serializer=request_class.SerializeToString,
        response_deserializer=response_class.FromString,
    )
    try:
        assert isinstance(call(request_class(), timeout=30), response_class)
    except grpc.RpcError as exc:
        assert exc.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), exc
        assert "Traceback" not in (exc.details() or "")


def test_a_stream_that_sends_nothing_ends_cleanly(channel: grpc.Channel) -> None:
    call = channel.stream_stream(
        f"/{SERVICE.full_name}/StreamEvaluation",
        request_serializer=service_pb2.StreamEvaluationRequest.SerializeToString,
        response_deserializer=service_pb2.StreamEvaluationResponse.FromString,
    )
    assert list(call(iter(()), timeout=30)) == []
