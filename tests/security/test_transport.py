"""TLS and mutual TLS on a real loopback gRPC server, probed with the health service."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from evalstream.client import transport
from evalstream.service import auth
from evalstream.service.settings import Settings
from tests.security.conftest import AioServer, Pki

TIMEOUT_S = 5.0


def _check(channel: grpc.Channel) -> health_pb2.HealthCheckResponse.ServingStatus.ValueType:
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT_S).status


def _tls_settings(pki: Pki, *, mutual: bool) -> Settings:
    return Settings(
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca_cert) if mutual else "",
    )


def test_plaintext_needs_no_credentials() -> None:
    assert auth.server_credentials(Settings()) is None


def test_tls_works_and_plaintext_client_fails(pki: Pki) -> None:
    creds = auth.server_credentials(_tls_settings(pki, mutual=False))
    assert creds is not None
    with AioServer(creds) as server:
        secure = grpc.secure_channel(server.target, transport.channel_credentials(pki.ca_cert))
        assert _check(secure) == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            _check(grpc.insecure_channel(server.target))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_client_refuses_server_from_unknown_ca(pki: Pki) -> None:
    creds = auth.server_credentials(_tls_settings(pki, mutual=False))
    assert creds is not None
    with AioServer(creds) as server, pytest.raises(grpc.RpcError) as info:
        _check(grpc.secure_channel(server.target, transport.channel_credentials(pki.rogue_ca_cert)))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_accepts_only_certificates_from_its_ca(pki: Pki) -> None:
    creds = auth.server_credentials(_tls_settings(pki, mutual=True))
    assert creds is not None
    with AioServer(creds) as server:
        good = transport.channel_credentials(pki.ca_cert, pki.client_cert, pki.client_key)
        assert _check(grpc.secure_channel(server.target, good)) == health_pb2.HealthCheckResponse.SERVING

        refused = {
            "no client certificate": transport.channel_credentials(pki.ca_cert),
            "certificate from another CA": transport.channel_credentials(
                pki.ca_cert, pki.rogue_client_cert, pki.rogue_client_key
            ),
        }
        for why, channel_creds in refused.items():
            with pytest.raises(grpc.RpcError) as info:
                _check(grpc.secure_channel(server.target, channel_creds))
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, why
        with pytest.raises(grpc.RpcError):
            _check(grpc.insecure_channel(server.target))


def test_server_probing_itself_under_mutual_tls_needs_client_auth_usage(pki: Pki) -> None:
    """A pod's health check presents the server's own certificate under mTLS: that works only
    when the certificate allows clientAuth as well as serverAuth (docs/security.md says so)."""
    settings = Settings(
        tls_cert_file=str(pki.dual_cert), tls_key_file=str(pki.dual_key), tls_client_ca_file=str(pki.ca_cert)
    )
    with AioServer(auth.server_credentials(settings)) as server:
        itself = transport.channel_credentials(pki.ca_cert, pki.dual_cert, pki.dual_key)
        assert _check(grpc.secure_channel(server.target, itself)) == health_pb2.HealthCheckResponse.SERVING
        server_only = transport.channel_credentials(pki.ca_cert, pki.server_cert, pki.server_key)
        with pytest.raises(grpc.RpcError) as info:
            _check(grpc.secure_channel(server.target, server_only))
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_incomplete_tls_settings_are_errors(pki: Pki, tmp_path: Path) -> None:
    class Partial:
        tls_cert_file = str(pki.server_cert)
        tls_key_file = ""

    with pytest.raises(auth.SecurityConfigError, match="both tls_cert_file and tls_key_file"):
        auth.server_credentials(Partial())
    with pytest.raises(auth.SecurityConfigError, match="mutual TLS needs the server's own certificate"):
        auth.server_credentials(auth.SecurityConfig(tls_client_ca_file=pki.ca_cert))
    with pytest.raises(auth.SecurityConfigError, match="tls_key_file: cannot read"):
        auth.server_credentials(
            auth.SecurityConfig(tls_cert_file=pki.server_cert, tls_key_file=tmp_path / "x")
        )
    with pytest.raises(auth.SecurityConfigError, match="must be PEM"):
        auth.server_credentials(
            auth.SecurityConfig(tls_cert_file=pki.server_key, tls_key_file=pki.server_key)
        )
    with pytest.raises(ValueError, match="needs its key"):
        transport.channel_credentials(pki.ca_cert, client_cert_file=pki.client_cert)


def test_metrics_tls_options(pki: Pki) -> None:
    assert auth.metrics_tls_options(Settings()) == {}
    cfg = auth.SecurityConfig(
        metrics_tls_cert_file=pki.server_cert,
        metrics_tls_key_file=pki.server_key,
        metrics_tls_client_ca_file=pki.ca_cert,
    )
    assert auth.metrics_tls_options(cfg) == {
        "certfile": str(pki.server_cert),
        "keyfile": str(pki.server_key),
        "client_cafile": str(pki.ca_cert),
        "client_auth_required": True,
    }
    with pytest.raises(auth.SecurityConfigError, match="metrics TLS needs both"):
        auth.metrics_tls_options(auth.SecurityConfig(metrics_tls_cert_file=pki.server_cert))
