"""The bearer-token interceptor on a real loopback gRPC server, for unary and streaming RPCs.

The EvalStreamService registered here is the generated base servicer: a call
that gets UNIMPLEMENTED passed authorization, so only the interceptor decides.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from evalstream.client import transport
from evalstream.service import auth
from evalstream.service.settings import Settings
from evalstream.v1 import evaluation_pb2, service_pb2, service_pb2_grpc
from tests.security.conftest import FULL_TOKEN, READ_ONLY_TOKEN, AioServer, Pki

TIMEOUT_S = 5.0
KEY = evaluation_pb2.EvaluationKey(run="r", model="m", split="val")


def _calls(
    stub: service_pb2_grpc.EvalStreamServiceStub, metadata: tuple[tuple[str, str], ...]
) -> dict[str, object]:
    """One call of every EvalStreamService method; each returns the call's status code."""

    def code(call: object) -> grpc.StatusCode:
        try:
            if isinstance(call, Iterator):
                list(call)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    def unary(method: grpc.UnaryUnaryMultiCallable, request: object) -> grpc.StatusCode:
        try:
            method(request, metadata=metadata, timeout=TIMEOUT_S)
            return grpc.StatusCode.OK
        except grpc.RpcError as e:
            return e.code()

    stream_requests = iter([service_pb2.StreamEvaluationRequest(open=service_pb2.OpenShard(key=KEY))])
    return {
        "StreamEvaluation": code(
            stub.StreamEvaluation(stream_requests, metadata=metadata, timeout=TIMEOUT_S)
        ),
        "FinalizeEvaluation": unary(stub.FinalizeEvaluation, service_pb2.FinalizeEvaluationRequest(key=KEY)),
        "PinEvaluation": unary(stub.PinEvaluation, service_pb2.PinEvaluationRequest(key=KEY, pinned=True)),
        "GetEvaluation": unary(stub.GetEvaluation, service_pb2.GetEvaluationRequest()),
        "ListEvaluations": unary(stub.ListEvaluations, service_pb2.ListEvaluationsRequest()),
        "CompareModels": unary(stub.CompareModels, service_pb2.CompareModelsRequest(run="r")),
        "ListMetrics": unary(stub.ListMetrics, service_pb2.ListMetricsRequest()),
    }


WRITES = {"StreamEvaluation", "FinalizeEvaluation", "PinEvaluation"}
READS = {"GetEvaluation", "ListEvaluations", "CompareModels", "ListMetrics"}
PASSED = grpc.StatusCode.UNIMPLEMENTED  # reached the (base) servicer


@pytest.fixture
def server(token_files: tuple[Path, Path]) -> Iterator[AioServer]:
    full, read_only = token_files
    settings = Settings(auth_tokens_file=str(full), auth_read_only_tokens_file=str(read_only))
    denied: list[tuple[str, grpc.StatusCode]] = []
    with AioServer(
        interceptors=auth.interceptors(settings, environ={}, on_denied=lambda m, c: denied.append((m, c)))
    ) as s:
        s.denied = denied  # type: ignore[attr-defined]
        yield s


def test_every_method_needs_a_token(server: AioServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        assert _calls(stub, ()) == dict.fromkeys(WRITES | READS, grpc.StatusCode.UNAUTHENTICATED)
        unknown = transport.token_metadata("not-a-configured-token-0123456789")
        assert _calls(stub, unknown) == dict.fromkeys(WRITES | READS, grpc.StatusCode.UNAUTHENTICATED)
        basic = (("authorization", "Basic dXNlcjpwYXNz"),)
        assert set(_calls(stub, basic).values()) == {grpc.StatusCode.UNAUTHENTICATED}
    assert len(server.denied) == 3 * len(WRITES | READS)  # type: ignore[attr-defined]


def test_refusal_says_how_to_send_a_token(server: AioServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.ListMetrics(service_pb2.ListMetricsRequest(), timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer <token>" in (info.value.details() or "")


def test_read_only_token_reads_but_cannot_write(server: AioServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        codes = _calls(stub, transport.token_metadata(READ_ONLY_TOKEN))
        with pytest.raises(grpc.RpcError) as info:
            list(
                stub.StreamEvaluation(
                    iter([service_pb2.StreamEvaluationRequest()]),
                    metadata=transport.token_metadata(READ_ONLY_TOKEN),
                    timeout=TIMEOUT_S,
                )
            )
    assert codes == {
        **dict.fromkeys(READS, PASSED),
        **dict.fromkeys(WRITES, grpc.StatusCode.PERMISSION_DENIED),
    }
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "read-only" in (info.value.details() or "")
    assert READ_ONLY_TOKEN not in (info.value.details() or "")


def test_full_token_may_call_everything(server: AioServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        assert _calls(stub, transport.token_metadata(FULL_TOKEN)) == dict.fromkeys(WRITES | READS, PASSED)
        lowercase_scheme = (("authorization", f"bearer {FULL_TOKEN}"),)
        assert set(_calls(stub, lowercase_scheme).values()) == {PASSED}


def test_health_needs_no_token(server: AioServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_unknown_method_stays_unimplemented(server: AioServer) -> None:
    with grpc.insecure_channel(server.target) as channel:
        call = channel.unary_unary("/evalstream.v1.EvalStreamService/NoSuchMethod", None, None)
        with pytest.raises(grpc.RpcError) as info:
            call(b"", timeout=TIMEOUT_S)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_token_call_credentials_over_mutual_tls(pki: Pki, token_files: tuple[Path, Path]) -> None:
    full, read_only = token_files
    settings = Settings(
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca_cert),
        auth_tokens_file=str(full),
        auth_read_only_tokens_file=str(read_only),
    )
    with AioServer(auth.server_credentials(settings), auth.interceptors(settings, environ={})) as server:
        tls = transport.channel_credentials(pki.ca_cert, pki.client_cert, pki.client_key)
        for token, expected in ((FULL_TOKEN, PASSED), (READ_ONLY_TOKEN, grpc.StatusCode.PERMISSION_DENIED)):
            creds = grpc.composite_channel_credentials(tls, transport.token_call_credentials(token))
            with grpc.secure_channel(server.target, creds) as channel:
                stub = service_pb2_grpc.EvalStreamServiceStub(channel)
                assert _calls(stub, ())["FinalizeEvaluation"] == expected
