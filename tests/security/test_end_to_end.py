"""The real server (BackgroundServer) with mutual TLS, bearer tokens and /metrics over mutual TLS,
driven by the real EvalClient: good credentials work, every bad one is refused with the right status,
and the Prometheus exposition never carries request contents."""

from __future__ import annotations

import os
import re
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from evalstream.client import EvalClient
from evalstream.client.errors import EvalStreamError
from evalstream.client.transport import RetryPolicy, TLSConfig
from evalstream.service import auth
from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from tests.security.conftest import FULL_TOKEN, READ_ONLY_TOKEN, Pki

NUM_CLASSES = 10
RUN = "sec-run"
# Distinctive request contents that must never show up on /metrics.
SAMPLE_ID_BASE = 987_654_321_000
MARKER_LOGIT = 7.7770777
ONE_TRY = RetryPolicy(max_attempts=1)
WRITE_METHODS = {"StreamEvaluation", "FinalizeEvaluation", "PinEvaluation"}


@dataclass
class Deployment:
    server: BackgroundServer
    pki: Pki
    tls: TLSConfig

    def client(self, token: str | None, tls: TLSConfig | None = None) -> EvalClient:
        return EvalClient(
            self.server.target, credentials=tls or self.tls, token=token, timeout=10.0, retry=ONE_TRY
        )


def _scores(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, NUM_CLASSES)).astype(np.float32)
    logits[:, 3] = MARKER_LOGIT
    labels = rng.integers(0, NUM_CLASSES, size=n).astype(np.int64)
    ids = SAMPLE_ID_BASE + np.arange(n, dtype=np.int64)
    return logits, labels, ids


def _stream(client: EvalClient, model: str, *, world_size: int = 1, seed: int = 0) -> None:
    with client.evaluation(
        run=RUN, model=model, split="val", num_classes=NUM_CLASSES, world_size=world_size
    ) as ev:
        ev.add(*_scores(64, seed))


@pytest.fixture(scope="module")
def deployment(pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    d = tmp_path_factory.mktemp("secure")
    (d / "tokens").write_text(f"# writers\n{FULL_TOKEN}\n")
    (d / "read-only-tokens").write_text(f"{READ_ONLY_TOKEN}\n")
    settings = Settings.load(
        env={},
        data_dir=str(d / "data"),
        grpc_address="127.0.0.1:0",
        metrics_address="127.0.0.1:0",
        device="cpu",
        engine_backend=os.environ.get("EVALSTREAM_ENGINE_BACKEND", "eager"),
        shutdown_grace_s=1.0,
        tls_cert_file=str(pki.server_cert),
        tls_key_file=str(pki.server_key),
        tls_client_ca_file=str(pki.ca_cert),
        auth_tokens_file=str(d / "tokens"),
        auth_read_only_tokens_file=str(d / "read-only-tokens"),
        metrics_tls_cert_file=str(pki.server_cert),
        metrics_tls_key_file=str(pki.server_key),
        metrics_tls_client_ca_file=str(pki.ca_cert),
    )
    tls = TLSConfig(
        root_cert=str(pki.ca_cert), client_cert=str(pki.client_cert), client_key=str(pki.client_key)
    )
    with BackgroundServer(settings) as server:
        yield Deployment(server, pki, tls)


@pytest.fixture(scope="module")
def populated(deployment: Deployment) -> Deployment:
    """Two finalized evaluations streamed with the full token: one closed by its only rank, one of
    two ranks finalized explicitly (so FinalizeEvaluation is exercised with good credentials)."""
    with deployment.client(FULL_TOKEN) as writer:
        _stream(writer, "model-a", seed=1)
        _stream(writer, "model-b", world_size=2, seed=2)
        finalized = writer.finalize(RUN, "model-b", split="val")
    assert finalized.HasField("result")
    return deployment


def test_full_token_streams_and_finalizes_read_only_token_reads(populated: Deployment) -> None:
    with populated.client(READ_ONLY_TOKEN) as reader:
        listed = reader.list(run=RUN)
        assert sorted(e.key.model for e in listed) == ["model-a", "model-b"]
        assert reader.get(RUN, "model-a", split="val").result.num_samples == 64
        assert len(reader.metrics().metrics) > 0
        compared = reader.compare(RUN, split="val")
        assert sorted(c.ref.model for c in compared.candidates) == ["model-a", "model-b"]


def test_read_only_token_cannot_stream_finalize_or_pin(populated: Deployment) -> None:
    with populated.client(READ_ONLY_TOKEN) as reader:
        with pytest.raises(EvalStreamError) as streaming:
            _stream(reader, "model-c")
        with pytest.raises(EvalStreamError) as finalizing:
            reader.finalize(RUN, "model-a", split="val")
        with pytest.raises(EvalStreamError) as pinning:
            reader.pin(RUN, "model-a", split="val")
    for refused in (streaming, finalizing, pinning):
        assert refused.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert "read-only" in str(refused.value)
    with populated.client(FULL_TOKEN) as writer:
        assert "model-c" not in {e.key.model for e in writer.list(run=RUN)}


@pytest.mark.parametrize("token", [None, "unknown-token-0123456789abcdef0123"], ids=["missing", "unknown"])
def test_missing_or_unknown_token_is_unauthenticated(deployment: Deployment, token: str | None) -> None:
    with deployment.client(token) as anonymous:
        with pytest.raises(EvalStreamError) as listing:
            anonymous.list()
        with pytest.raises(EvalStreamError) as streaming:
            _stream(anonymous, "model-x")
    for refused in (listing, streaming):
        assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert "authorization: Bearer" in str(refused.value)


def test_wrong_or_missing_client_certificate_is_refused(deployment: Deployment) -> None:
    pki = deployment.pki
    wrong = {
        "certificate from another CA": TLSConfig(
            root_cert=str(pki.ca_cert),
            client_cert=str(pki.rogue_client_cert),
            client_key=str(pki.rogue_client_key),
        ),
        "no client certificate": TLSConfig(root_cert=str(pki.ca_cert)),
        "server not trusted": TLSConfig(
            root_cert=str(pki.rogue_ca_cert), client_cert=str(pki.client_cert), client_key=str(pki.client_key)
        ),
    }
    for why, tls in wrong.items():
        with deployment.client(FULL_TOKEN, tls) as client, pytest.raises(EvalStreamError) as refused:
            client.metrics()
        assert refused.value.code == grpc.StatusCode.UNAVAILABLE, why


def test_plaintext_client_cannot_talk_to_tls_server(deployment: Deployment) -> None:
    with grpc.insecure_channel(deployment.server.target) as channel, pytest.raises(grpc.RpcError) as refused:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_health_needs_no_token(deployment: Deployment) -> None:
    creds = deployment.tls.channel_credentials()
    with grpc.secure_channel(deployment.server.target, creds) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def _scrape(url: str, context: ssl.SSLContext | None) -> str:
    with urllib.request.urlopen(url, timeout=5, context=context) as response:
        return str(response.read().decode())


def test_metrics_over_mutual_tls_show_no_request_contents(populated: Deployment) -> None:
    pki = populated.pki
    with populated.client(None) as anonymous, pytest.raises(EvalStreamError):
        anonymous.list(run=RUN)  # a refusal the interceptor counts
    url = f"https://{populated.server.metrics_target}/metrics"
    context = ssl.create_default_context(cafile=str(pki.ca_cert))
    context.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    text = _scrape(url, context)

    labels: dict[str, set[str]] = {}
    refusals = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for key, value in sample.labels.items():
                labels.setdefault(key, set()).add(value)
            if sample.name == "evalstream_rpc_errors_total" and sample.labels == {
                "method": "ListEvaluations",
                "code": "UNAUTHENTICATED",
            }:
                refusals = sample.value
    assert refusals >= 1
    # Only aggregate labels: the evaluation's run/model/split, and fixed vocabularies.
    assert set(labels) <= {
        "run",
        "model",
        "split",
        "reason",
        "method",
        "code",
        "le",
        "bin",
        "quantile",
        "mode",
        "outcome",
    }
    assert labels["run"] == {RUN} and labels["model"] == {"model-a", "model-b"} and labels["split"] == {"val"}
    assert labels["method"] <= set({m.rsplit("/", 1)[-1] for m in auth.READ_ONLY_METHODS} | WRITE_METHODS)
    assert labels["code"] <= {code.name for code in grpc.StatusCode}
    assert all(re.fullmatch(r"[a-z_]+", reason) for reason in labels.get("reason", ()))
    assert labels.get("outcome", set()) <= {"notified", "polled", "timeout"}
    # Request contents and credentials appear nowhere, not even in help text.
    for secret in (FULL_TOKEN, READ_ONLY_TOKEN, "Bearer", "authorization", str(SAMPLE_ID_BASE)[:9], "7.777"):
        assert secret not in text, secret
    assert "trainer" not in text  # the client certificate's subject

    without_cert = ssl.create_default_context(cafile=str(pki.ca_cert))
    with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
        _scrape(url, without_cert)
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        _scrape(f"http://{populated.server.metrics_target}/metrics", None)


def test_tokens_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Plaintext on loopback with tokens from EVALSTREAM_AUTH_TOKENS, which are not settings."""
    env_token = "environment-token-0123456789abcdef"
    monkeypatch.setenv(auth.ENV_TOKENS, env_token)
    settings = Settings.load(
        data_dir=str(tmp_path / "data"), grpc_address="127.0.0.1:0", metrics_address="", device="cpu"
    )
    with BackgroundServer(settings) as server:
        with EvalClient(server.target, token=env_token, retry=ONE_TRY, timeout=10.0) as client:
            assert client.list() == []
        with (
            EvalClient(server.target, retry=ONE_TRY, timeout=10.0) as client,
            pytest.raises(EvalStreamError) as e,
        ):
            client.list()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
