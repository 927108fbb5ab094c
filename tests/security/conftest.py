"""Test PKI generated per session with ``cryptography``: no private key is ever committed.

Two independent CAs: the trusted one signs the server certificate (SAN
127.0.0.1 and localhost) and the good client certificate; the rogue one signs a
client certificate the server must refuse.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2_grpc

from evalstream.v1 import service_pb2_grpc


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_ca_cert: Path
    rogue_client_cert: Path
    rogue_client_key: Path
    # serverAuth + clientAuth: a server certificate the pod's own health check can present under mTLS.
    dual_cert: Path
    dual_key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    path.chmod(0o600)
    return path


def _write_cert(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _builder(
    subject: str, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey
) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
    )


def _ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _builder(cn, _name(cn), key.public_key())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    cn: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    *,
    server: bool,
    client: bool | None = None,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
    if client if client is not None else not server:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        _builder(cn, ca_cert.subject, key.public_key())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, builder.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, ca_cert = _ca("evalstream test CA")
    server_key, server_cert = _leaf("evalstream server", ca_key, ca_cert, server=True)
    client_key, client_cert = _leaf("trainer", ca_key, ca_cert, server=False)
    rogue_ca_key, rogue_ca_cert = _ca("rogue CA")
    rogue_key, rogue_cert = _leaf("trainer", rogue_ca_key, rogue_ca_cert, server=False)
    dual_key, dual_cert = _leaf("evalstream server", ca_key, ca_cert, server=True, client=True)
    return Pki(
        ca_cert=_write_cert(d / "ca.pem", ca_cert),
        server_cert=_write_cert(d / "server.pem", server_cert),
        server_key=_write_key(d / "server.key", server_key),
        client_cert=_write_cert(d / "client.pem", client_cert),
        client_key=_write_key(d / "client.key", client_key),
        rogue_ca_cert=_write_cert(d / "rogue-ca.pem", rogue_ca_cert),
        rogue_client_cert=_write_cert(d / "rogue-client.pem", rogue_cert),
        rogue_client_key=_write_key(d / "rogue-client.key", rogue_key),
        dual_cert=_write_cert(d / "dual.pem", dual_cert),
        dual_key=_write_key(d / "dual.key", dual_key),
    )


FULL_TOKEN = "full-token-0123456789abcdef0123456789abcdef"
READ_ONLY_TOKEN = "read-only-token-0123456789abcdef0123456789"


@pytest.fixture
def token_files(tmp_path: Path) -> tuple[Path, Path]:
    """A full-token file and a read-only-token file, with a comment and a blank line each."""
    full = tmp_path / "tokens"
    full.write_text(f"# CI writers\n\n{FULL_TOKEN}\n")
    read_only = tmp_path / "read-only-tokens"
    read_only.write_text(f"{READ_ONLY_TOKEN}  # dashboards\n")
    return full, read_only


class AioServer:
    """A grpc.aio server on 127.0.0.1 in its own thread and event loop, for blocking test clients.

    Serves the standard health service and the generated EvalStreamService base
    servicer, which answers UNIMPLEMENTED: a call that gets UNIMPLEMENTED got
    past the interceptors, so the interceptor is tested without any service logic.
    """

    def __init__(
        self,
        credentials: grpc.ServerCredentials | None = None,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self._credentials = credentials
        self._interceptors = list(interceptors)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def _start(self) -> None:
        server = grpc.aio.server(interceptors=self._interceptors)
        health_pb2_grpc.add_HealthServicer_to_server(health_aio.HealthServicer(), server)
        service_pb2_grpc.add_EvalStreamServiceServicer_to_server(
            service_pb2_grpc.EvalStreamServiceServicer(), server
        )
        if self._credentials is None:
            self.port = server.add_insecure_port("127.0.0.1:0")
        else:
            self.port = server.add_secure_port("127.0.0.1:0", self._credentials)
        await server.start()
        self._server = server

    def __enter__(self) -> AioServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(0), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"
