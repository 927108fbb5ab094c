"""Transport security and bearer-token authorization for the gRPC port.

Everything here is off unless configured, so the embedded quick start on
loopback needs no certificates or tokens. Turning it on is a matter of file
paths in the settings (TLS, mutual TLS, token files) or token environment
variables; see docs/security.md.

Two token classes exist because the people who read results (dashboards, CI
gates running CompareModels) should not be able to write them: a leaked
read-only token cannot inject scores or finalize an evaluation early.

Tokens are held only as SHA-256 digests and compared with
``hmac.compare_digest`` against every configured digest without early exit, so
neither the response time nor the logs reveal which token (or how much of one)
matched. Token values are never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from evalstream.v1 import service_pb2

log = logging.getLogger(__name__)

ENV_TOKENS = "EVALSTREAM_AUTH_TOKENS"
ENV_READ_ONLY_TOKENS = "EVALSTREAM_AUTH_READ_ONLY_TOKENS"

# RFC 6750 b64token; anything else cannot travel in an "authorization" header unchanged.
_TOKEN_SYNTAX = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
# Short tokens are guessable; `openssl rand -hex 32` gives 64 characters.
MIN_TOKEN_LENGTH = 16
# How often a token file is checked for changes (mounted secrets are rotated in place).
_RELOAD_INTERVAL_S = 10.0

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


class SecurityConfigError(ValueError):
    """The security settings are inconsistent or point at unusable files; raised at startup."""


class Role(Enum):
    """What an authenticated caller may do."""

    FULL = "full"
    READ_ONLY = "read_only"


@dataclass(frozen=True)
class SecurityConfig:
    """The security-related settings, read from whatever settings object the server uses.

    Empty strings count as unset so that environment variables can clear a value
    set in a config file.
    """

    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    tls_client_ca_file: Path | None = None
    auth_tokens_file: Path | None = None
    auth_read_only_tokens_file: Path | None = None
    metrics_tls_cert_file: Path | None = None
    metrics_tls_key_file: Path | None = None
    metrics_tls_client_ca_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: object) -> SecurityConfig:
        """Take the fields this module knows from ``settings``; missing attributes mean unset."""
        if isinstance(settings, SecurityConfig):
            return settings
        values: dict[str, Path | None] = {}
        for f in fields(cls):
            raw = getattr(settings, f.name, None)
            values[f.name] = Path(os.fspath(raw)).expanduser() if raw not in (None, "") else None
        return cls(**values)

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None


def _read(path: Path, setting: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise SecurityConfigError(f"{setting}: cannot read {path}: {e.strerror or e}") from e


# ---------------------------------------------------------------------------------------------
# TLS


def server_credentials(settings: object) -> grpc.ServerCredentials | None:
    """TLS credentials for the gRPC port, or None for plaintext.

    TLS when ``tls_cert_file`` and ``tls_key_file`` are set; mutual TLS (clients
    must present a certificate signed by that CA) when ``tls_client_ca_file`` is
    set as well. The server then calls ``server.add_secure_port(address, creds)``.
    """
    cfg = SecurityConfig.from_settings(settings)
    if cfg.tls_cert_file is None and cfg.tls_key_file is None:
        if cfg.tls_client_ca_file is not None:
            raise SecurityConfigError(
                "tls_client_ca_file is set but tls_cert_file / tls_key_file are not: "
                "mutual TLS needs the server's own certificate and key too"
            )
        return None
    if cfg.tls_cert_file is None or cfg.tls_key_file is None:
        raise SecurityConfigError("TLS needs both tls_cert_file and tls_key_file; only one is set")
    cert = _read(cfg.tls_cert_file, "tls_cert_file")
    key = _read(cfg.tls_key_file, "tls_key_file")
    if b"-----BEGIN CERTIFICATE-----" not in cert or b"PRIVATE KEY-----" not in key:
        raise SecurityConfigError(
            f"tls_cert_file {cfg.tls_cert_file} and tls_key_file {cfg.tls_key_file} must be PEM "
            "(a certificate chain and a private key)"
        )
    client_ca = _read(cfg.tls_client_ca_file, "tls_client_ca_file") if cfg.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def metrics_tls_options(settings: object) -> dict[str, Any]:
    """Keyword arguments for ``prometheus_client.start_http_server`` to serve /metrics over (m)TLS.

    Empty when ``metrics_tls_cert_file`` is unset (plain HTTP, typically on an
    address only the scraper can reach).
    """
    cfg = SecurityConfig.from_settings(settings)
    if cfg.metrics_tls_cert_file is None and cfg.metrics_tls_key_file is None:
        if cfg.metrics_tls_client_ca_file is not None:
            raise SecurityConfigError(
                "metrics_tls_client_ca_file needs metrics_tls_cert_file and metrics_tls_key_file"
            )
        return {}
    if cfg.metrics_tls_cert_file is None or cfg.metrics_tls_key_file is None:
        raise SecurityConfigError("metrics TLS needs both metrics_tls_cert_file and metrics_tls_key_file")
    for name in ("metrics_tls_cert_file", "metrics_tls_key_file", "metrics_tls_client_ca_file"):
        path = getattr(cfg, name)
        if path is not None:
            _read(path, name)  # fail at startup with the setting's name, not deep inside ssl
    options: dict[str, Any] = {
        "certfile": str(cfg.metrics_tls_cert_file),
        "keyfile": str(cfg.metrics_tls_key_file),
    }
    if cfg.metrics_tls_client_ca_file is not None:
        options["client_cafile"] = str(cfg.metrics_tls_client_ca_file)
        options["client_auth_required"] = True
    return options


def channel_credentials(
    root_cert_file: str | os.PathLike[str] | None = None,
    client_cert_file: str | os.PathLike[str] | None = None,
    client_key_file: str | os.PathLike[str] | None = None,
) -> grpc.ChannelCredentials:
    """Client-side TLS credentials: trust ``root_cert_file`` (system roots if None) and, for
    mutual TLS, present ``client_cert_file`` / ``client_key_file``."""
    if (client_cert_file is None) != (client_key_file is None):
        raise SecurityConfigError("a client certificate needs its key, and a key its certificate")
    root = _read(Path(root_cert_file), "root_cert_file") if root_cert_file is not None else None
    cert = _read(Path(client_cert_file), "client_cert_file") if client_cert_file is not None else None
    key = _read(Path(client_key_file), "client_key_file") if client_key_file is not None else None
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=cert)


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying ``token``; works on plaintext loopback channels too."""
    return (("authorization", f"Bearer {token}"),)


def token_call_credentials(token: str) -> grpc.CallCredentials:
    """Call credentials carrying ``token``; gRPC only sends them over TLS (or local) channels."""
    return grpc.access_token_call_credentials(token)


def is_loopback(address: str) -> bool:
    """Whether a gRPC bind address ("host:port", "[::1]:port", "unix:...") is reachable only locally."""
    if address.startswith("unix:"):
        return True
    host = address.rsplit(":", 1)[0] if ":" in address else address
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_if_exposed(settings: object, address: str, environ: Mapping[str, str] | None = None) -> None:
    """Log a warning when a non-loopback address is served with neither TLS nor tokens.

    Not an error: a pod behind a mesh that terminates mTLS is a legitimate setup.
    """
    if is_loopback(address):
        return
    cfg = SecurityConfig.from_settings(settings)
    env = os.environ if environ is None else environ
    has_tokens = bool(
        cfg.auth_tokens_file
        or cfg.auth_read_only_tokens_file
        or env.get(ENV_TOKENS)
        or env.get(ENV_READ_ONLY_TOKENS)
    )
    if not cfg.tls and not has_tokens:
        log.warning(
            "serving %s without TLS or bearer tokens: anyone who can reach it can stream and finalize "
            "evaluations; see docs/security.md",
            address,
        )
    elif not cfg.tls:
        log.warning("bearer tokens on %s travel in clear text without TLS; see docs/security.md", address)


# ---------------------------------------------------------------------------------------------
# Tokens


def parse_tokens(text: str, source: str, *, separators: str = r"\n") -> list[str]:
    """Tokens from a file's text (one a line) or an environment variable (commas or whitespace).

    Blank lines and ``#`` comments are ignored. Malformed or short tokens are an
    error naming the source and line, never echoing the token.
    """
    tokens: list[str] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0]
        for token in re.split(separators, content):
            token = token.strip()
            if not token:
                continue
            if not _TOKEN_SYNTAX.match(token):
                raise SecurityConfigError(
                    f"{source} line {lineno}: a token may contain only letters, digits and -._~+/ "
                    "(trailing = allowed), one token a line"
                )
            if len(token) < MIN_TOKEN_LENGTH:
                raise SecurityConfigError(
                    f"{source} line {lineno}: token shorter than {MIN_TOKEN_LENGTH} characters; "
                    "generate one with `openssl rand -hex 32`"
                )
            tokens.append(token)
    return tokens


def _digest(token: str | bytes) -> bytes:
    # Equal-length digests make compare_digest's time independent of the presented token's length.
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


class _TokenSource:
    """One class of tokens (full or read-only): a file, re-read when it changes, plus environment tokens."""

    def __init__(self, path: Path | None, env_text: str, env_name: str) -> None:
        self._path = path
        self._env_digests = [_digest(t) for t in parse_tokens(env_text, env_name, separators=r"[\s,]+")]
        self._file_digests: list[bytes] = []
        self._stamp: tuple[int, int] | None = None
        self._checked_at = 0.0
        self._lock = threading.Lock()
        if path is not None:
            self._load(initial=True)

    @property
    def configured(self) -> bool:
        return self._path is not None or bool(self._env_digests)

    def _read_file(self, path: Path) -> tuple[tuple[int, int], list[bytes]] | None:
        """(stamp, digests) of the token file, or None when it has not changed since the last read."""
        try:
            st = path.stat()
            stamp = (st.st_mtime_ns, st.st_size)
            if stamp == self._stamp:
                return None
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise SecurityConfigError(f"token file {path}: cannot read: {e.strerror or e}") from e
        except UnicodeDecodeError as e:
            raise SecurityConfigError(f"token file {path}: not UTF-8 text") from e
        return stamp, [_digest(t) for t in parse_tokens(text, f"token file {path}")]

    def _load(self, *, initial: bool) -> None:
        assert self._path is not None
        try:
            loaded = self._read_file(self._path)
        except SecurityConfigError as e:
            if initial:
                raise
            log.error("%s; keeping the previous tokens", e)
            return
        if loaded is None:
            return
        stamp, digests = loaded
        self._file_digests, self._stamp = digests, stamp
        if not initial:
            log.info("token file %s reloaded: %d tokens", self._path, len(digests))

    def digests(self) -> list[bytes]:
        """Current digests; re-stats the file at most every few seconds."""
        if self._path is not None:
            now = time.monotonic()
            if now - self._checked_at >= _RELOAD_INTERVAL_S:
                with self._lock:
                    if now - self._checked_at >= _RELOAD_INTERVAL_S:
                        self._checked_at = now
                        self._load(initial=self._stamp is None)
        return self._env_digests + self._file_digests


def _matches(presented: bytes, digests: Sequence[bytes]) -> bool:
    found = False
    for d in digests:  # no early exit: every configured token is compared
        found |= hmac.compare_digest(presented, d)
    return found


class TokenStore:
    """Full and read-only tokens; answers which role a presented token has."""

    def __init__(self, full: _TokenSource, read_only: _TokenSource) -> None:
        self._full = full
        self._read_only = read_only
        both = set(full.digests()) & set(read_only.digests())
        if both:
            raise SecurityConfigError(
                f"{len(both)} token(s) appear both as full and as read-only tokens; each token needs one role"
            )

    @classmethod
    def from_settings(cls, settings: object, environ: Mapping[str, str] | None = None) -> TokenStore | None:
        """The configured tokens, or None when token authentication is off."""
        cfg = SecurityConfig.from_settings(settings)
        env = os.environ if environ is None else environ
        full = _TokenSource(cfg.auth_tokens_file, env.get(ENV_TOKENS, ""), ENV_TOKENS)
        read_only = _TokenSource(
            cfg.auth_read_only_tokens_file, env.get(ENV_READ_ONLY_TOKENS, ""), ENV_READ_ONLY_TOKENS
        )
        if not full.configured and not read_only.configured:
            return None
        if not full.configured:
            log.warning("only read-only tokens are configured: no client can stream or finalize evaluations")
        return cls(full, read_only)

    def role(self, token: str) -> Role | None:
        presented = _digest(token)
        is_full = _matches(presented, self._full.digests())
        is_read_only = _matches(presented, self._read_only.digests())
        if is_full:
            return Role.FULL
        return Role.READ_ONLY if is_read_only else None


# ---------------------------------------------------------------------------------------------
# Interceptor

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
