"""Channel construction, credentials and the retry policy shared by all client calls.

Retries cover what a restart or a dropped connection looks like from the
client (``UNAVAILABLE``) and a rank still leased to a stream the server has
not yet noticed is dead (``ABORTED``); every other status is the caller's
problem and is raised at once.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

MIB = 1 << 20
# Server default is 8 MiB; 4 MiB is gRPC's own default, so chunks fit any server.
DEFAULT_MAX_MESSAGE_BYTES = 4 * MIB
# Replies (an evaluation with per-class counts for many classes) can be large.
DEFAULT_MAX_RECEIVE_BYTES = 64 * MIB

RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for reconnecting and for retrying idempotent calls.

    ``max_attempts`` counts consecutive failed attempts; a stream that makes
    progress (opens, gets acknowledgements) starts counting again.
    """

    max_attempts: int = 8
    initial_backoff_s: float = 0.1
    max_backoff_s: float = 5.0
    multiplier: float = 2.0

    def backoff(self, attempt: int) -> float:
        """Seconds to sleep before attempt ``attempt`` (1-based), with +-20% jitter."""
        base = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** max(0, attempt - 1))
        return base * random.uniform(0.8, 1.2)


@dataclass(frozen=True)
class TLSConfig:
    """TLS (``root_cert`` only) or mutual TLS (plus ``client_cert``/``client_key``), as PEM file paths.

    ``server_name`` overrides the name checked against the server certificate
    (useful when connecting by IP to a certificate issued for a DNS name).
    """

    root_cert: str | None = None
    client_cert: str | None = None
    client_key: str | None = None
    server_name: str | None = None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if bool(self.client_cert) != bool(self.client_key):
            raise ValueError("client_cert and client_key must be given together")

        def read(p: str | None) -> bytes | None:
            return Path(p).read_bytes() if p else None

        return grpc.ssl_channel_credentials(
            root_certificates=read(self.root_cert),
            private_key=read(self.client_key),
            certificate_chain=read(self.client_cert),
        )


def make_channel(
    target: str,
    credentials: grpc.ChannelCredentials | TLSConfig | None,
    max_message_bytes: int,
    extra_options: list[tuple[str, int | str]] | None = None,
) -> grpc.Channel:
    """A channel that reconnects quickly after a server restart and accepts large replies."""
    options: list[tuple[str, int | str]] = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max(max_message_bytes, DEFAULT_MAX_RECEIVE_BYTES)),
        # gRPC's default reconnect backoff grows to 120 s; a restarted server
        # should be found again within a couple of seconds.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]
    if isinstance(credentials, TLSConfig):
        if credentials.server_name:
            options.append(("grpc.ssl_target_name_override", credentials.server_name))
        credentials = credentials.channel_credentials()
    options.extend(extra_options or [])
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def call_with_retry(
    fn: Callable[[], T], policy: RetryPolicy, sleep: Callable[[float], None] = time.sleep
) -> T:
    """Run an idempotent call, retrying retryable statuses with backoff."""
    attempt = 0
    while True:
        try:
            return fn()
        except grpc.RpcError as exc:
            attempt += 1
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code not in RETRYABLE or attempt >= policy.max_attempts:
                raise
            sleep(policy.backoff(attempt))
