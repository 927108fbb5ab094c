"""Channel construction, credentials and the retry policy shared by all client calls.

Credentials are the client's own: TLS or mutual TLS from PEM files (``TLSConfig``,
``channel_credentials``) and the bearer token as metadata or call credentials, for ``EvalClient``
and for callers of the raw gRPC stubs alike.

Retries cover what a restart or a dropped connection looks like from the
client (``UNAVAILABLE``) and a rank still leased to a stream the server has
not yet noticed is dead (``ABORTED``); every other status is the caller's
problem and is raised at once.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc

MIB = 1 << 20
# Server default is 8 MiB; 4 MiB is gRPC's own default, so chunks fit any server.
DEFAULT_MAX_MESSAGE_BYTES = 4 * MIB
# Replies (an evaluation with per-class counts for many classes) can be large.
DEFAULT_MAX_RECEIVE_BYTES = 64 * MIB

# Spread calls over every address of a multi-address target (gRPC's default sticks to the first).
ROUND_ROBIN: list[tuple[str, int | str]] = [
    ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"round_robin": {}}]}))
]

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
        return channel_credentials(self.root_cert or None, self.client_cert or None, self.client_key or None)


PathLike = str | os.PathLike[str]


def channel_credentials(
    root_cert_file: PathLike | None = None,
    client_cert_file: PathLike | None = None,
    client_key_file: PathLike | None = None,
) -> grpc.ChannelCredentials:
    """TLS credentials: trust ``root_cert_file`` (system roots if None) and, for mutual TLS,
    present ``client_cert_file`` / ``client_key_file`` (PEM files)."""
    if (client_cert_file is None) != (client_key_file is None):
        raise ValueError("a client certificate needs its key, and a key its certificate")

    def read(path: PathLike | None, what: str) -> bytes | None:
        if path is None:
            return None
        try:
            return Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"{what}: cannot read {path}: {e.strerror or e}") from e

    return grpc.ssl_channel_credentials(
        root_certificates=read(root_cert_file, "root certificate"),
        private_key=read(client_key_file, "client key"),
        certificate_chain=read(client_cert_file, "client certificate"),
    )


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Per-call metadata carrying ``token``; works on plaintext loopback channels too."""
    return (("authorization", f"Bearer {token}"),)


def token_call_credentials(token: str) -> grpc.CallCredentials:
    """Call credentials carrying ``token``; gRPC only sends them over TLS (or local) channels."""
    return grpc.access_token_call_credentials(token)


def channel_target(target: str | Sequence[str]) -> tuple[str, list[tuple[str, int | str]]]:
    """The gRPC target and balancing options for one server or a set of replicas.

    - ``"host:port"``: one server (or whatever gRPC's default resolver finds for it).
    - ``"dns:///name:port"``: every address the name resolves to (a Kubernetes headless Service);
      calls are spread round-robin, and the name is resolved again when a connection ends.
    - a list of ``"ip:port"`` (or one string of them, comma-separated): those replicas, round-robin.
    - any other gRPC target (``"ipv4:a:1,b:2"``, ``"unix:..."``) as gRPC reads it, with its default
      policy (pick_first: the first address that answers, the next when it fails).

    Each stream stays on the replica it opened on; a stream whose replica dies reconnects to
    another, which resumes it from the committed sequence in the shared store.
    """
    if isinstance(target, str):
        if "," not in target or ":///" in target or target.startswith(("ipv4:", "ipv6:")):
            return target, (ROUND_ROBIN if target.startswith("dns:") else [])
        target = [t.strip() for t in target.split(",") if t.strip()]
    addresses = list(target)
    if not addresses:
        raise ValueError("no server address given")
    if len(addresses) == 1:
        return addresses[0], []
    hosts = [a.rsplit(":", 1)[0].strip("[]") for a in addresses]
    try:
        versions = {ipaddress.ip_address(h).version for h in hosts}
    except ValueError:
        raise ValueError(
            f"a list of replicas must be IP:PORT addresses, got {addresses}; for names use one "
            "dns:///NAME:PORT target (e.g. a headless Service) that resolves to every replica"
        ) from None
    if len(versions) != 1:
        raise ValueError(f"a list of replicas must be all IPv4 or all IPv6, got {addresses}")
    return f"ipv{versions.pop()}:" + ",".join(addresses), ROUND_ROBIN


def make_channel(
    target: str | Sequence[str],
    credentials: grpc.ChannelCredentials | TLSConfig | None,
    max_message_bytes: int,
    extra_options: list[tuple[str, int | str]] | None = None,
) -> grpc.Channel:
    """A channel that reconnects quickly after a server restart and accepts large replies."""
    target, balancing = channel_target(target)
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
    options.extend(balancing)
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
