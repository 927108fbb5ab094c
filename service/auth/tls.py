"""The gRPC port's TLS or mutual TLS credentials, and a warning when it is exposed without either."""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Mapping

import grpc

from evalstream.service.auth.config import SecurityConfig, SecurityConfigError, read_file
from evalstream.service.auth.tokens import ENV_READ_ONLY_TOKENS, ENV_TOKENS

log = logging.getLogger(__name__)


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
    cert = read_file(cfg.tls_cert_file, "tls_cert_file")
    key = read_file(cfg.tls_key_file, "tls_key_file")
    if b"-----BEGIN CERTIFICATE-----" not in cert or b"PRIVATE KEY-----" not in key:
        raise SecurityConfigError(
            f"tls_cert_file {cfg.tls_cert_file} and tls_key_file {cfg.tls_key_file} must be PEM "
            "(a certificate chain and a private key)"
        )
    client_ca = read_file(cfg.tls_client_ca_file, "tls_client_ca_file") if cfg.tls_client_ca_file else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


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
