#!/usr/bin/env python3
"""gRPC health check for the container (Docker HEALTHCHECK and Kubernetes exec probes).

Kubelet's native gRPC probe cannot speak TLS, so when the server runs with TLS the
probes call this instead. Exit 0 when grpc.health.v1 answers SERVING, 1 otherwise.

Environment (all optional):
  EVALSTREAM_HEALTHCHECK_ADDRESS      host:port to check (default 127.0.0.1:50051)
  EVALSTREAM_TLS_CERT_FILE            set: connect with TLS (the server's own setting)
  EVALSTREAM_HEALTHCHECK_CA_FILE      CA that signed the server certificate
                                      (default: the server certificate itself)
  EVALSTREAM_HEALTHCHECK_SERVER_NAME  name to verify the certificate for (default localhost)
  EVALSTREAM_TLS_CLIENT_CA_FILE       set (mutual TLS): present EVALSTREAM_TLS_CERT_FILE /
                                      EVALSTREAM_TLS_KEY_FILE as the client certificate
"""

from __future__ import annotations

import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _channel(address: str) -> grpc.Channel:
    cert = os.environ.get("EVALSTREAM_TLS_CERT_FILE", "")
    if not cert:
        return grpc.insecure_channel(address)
    roots = _read(os.environ.get("EVALSTREAM_HEALTHCHECK_CA_FILE") or cert)
    key_file = os.environ.get("EVALSTREAM_TLS_KEY_FILE", "")
    mutual = bool(os.environ.get("EVALSTREAM_TLS_CLIENT_CA_FILE")) and bool(key_file)
    creds = grpc.ssl_channel_credentials(
        root_certificates=roots,
        private_key=_read(key_file) if mutual else None,
        certificate_chain=_read(cert) if mutual else None,
    )
    name = os.environ.get("EVALSTREAM_HEALTHCHECK_SERVER_NAME", "localhost")
    return grpc.secure_channel(address, creds, options=[("grpc.ssl_target_name_override", name)])


def main() -> int:
    address = os.environ.get("EVALSTREAM_HEALTHCHECK_ADDRESS", "127.0.0.1:50051")
    try:
        with _channel(address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=3
            )
    except (grpc.RpcError, OSError) as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(status)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    sys.exit(main())
