"""The server interceptor: each call admitted, refused (no or unknown token) or limited (read-only).

Health checks and reflection stay open: kubelet and load-balancer probes carry no token, and
reflection only describes the public contract.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc
import grpc.aio

from evalstream.service.auth.config import SecurityConfig
from evalstream.service.auth.tokens import Role, TokenStore
from evalstream.v1 import service_pb2

log = logging.getLogger(__name__)

_SERVICE = service_pb2.DESCRIPTOR.services_by_name["EvalStreamService"].full_name
# Everything else on the service (and any method added later) needs a full token.
READ_ONLY_METHODS = frozenset(
    f"/{_SERVICE}/{name}" for name in ("GetEvaluation", "ListEvaluations", "CompareModels", "ListMetrics")
)
# Kubelet and load-balancer probes carry no token; reflection only describes the public contract.
OPEN_METHOD_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)

_HOW_TO_SEND = "send gRPC metadata 'authorization: Bearer <token>'"

# gRPC's continuation returns None for methods no service registered (typed stubs say otherwise).
Continuation = Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]]


def _bearer(metadata: Sequence[Any] | None) -> str | None:
    for item in metadata or ():
        key, value = item[0], item[1]
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = str(value).strip().partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


def _denying_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str
) -> grpc.RpcMethodHandler:
    """A handler of the same streaming kind as ``handler`` that ends the call with ``code``.

    No request deserializer: a refused caller's payload is never parsed.
    """

    async def deny_unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, details)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, details)
        yield  # pragma: no cover - makes this an async generator; abort raises first

    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(deny_stream)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(deny_unary)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(deny_stream)
    return grpc.unary_unary_rpc_method_handler(deny_unary)


class BearerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without a known token (UNAUTHENTICATED) and writes with a read-only one
    (PERMISSION_DENIED); health checks and reflection stay open.

    ``on_denied(method, code)`` is called for each refusal, e.g. to count it in telemetry.
    """

    def __init__(
        self, tokens: TokenStore, on_denied: Callable[[str, grpc.StatusCode], None] | None = None
    ) -> None:
        self._tokens = tokens
        self._on_denied = on_denied

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler  # unknown methods get UNIMPLEMENTED from gRPC itself
        token = _bearer(handler_call_details.invocation_metadata)
        role = self._tokens.role(token) if token is not None else None
        if role is None:
            why = "no bearer token" if token is None else "the bearer token is not recognized"
            return self._deny(handler, method, grpc.StatusCode.UNAUTHENTICATED, f"{why}: {_HOW_TO_SEND}")
        if role is Role.READ_ONLY and method not in READ_ONLY_METHODS:
            short = method.rsplit("/", 1)[-1]
            return self._deny(
                handler,
                method,
                grpc.StatusCode.PERMISSION_DENIED,
                f"the token is read-only: it may call GetEvaluation, ListEvaluations, CompareModels and "
                f"ListMetrics, not {short}; use a full token to stream or change evaluations",
            )
        return handler

    def _deny(
        self, handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode, details: str
    ) -> grpc.RpcMethodHandler:
        short = method.rsplit("/", 1)[-1]
        log.info("refused %s: %s", short, code.name)
        if self._on_denied is not None:
            self._on_denied(short, code)
        return _denying_handler(handler, code, details)


def interceptors(
    settings: object,
    environ: Mapping[str, str] | None = None,
    on_denied: Callable[[str, grpc.StatusCode], None] | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """The server interceptors the security settings call for: a bearer-token check when any
    token file or token environment variable is set, else none."""
    tokens = TokenStore.from_settings(settings, environ)
    if tokens is None:
        return []
    cfg = SecurityConfig.from_settings(settings)
    if not cfg.tls:
        log.info("bearer tokens are on without TLS; use TLS on any non-loopback address")
    return [BearerTokenInterceptor(tokens, on_denied)]
