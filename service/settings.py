"""Server configuration: defaults < TOML/YAML file < ``EVALSTREAM_*`` environment < explicit overrides.

Every setting is a field of ``Settings`` with its documentation next to it
(docs/configuration.md is the same table for readers). The file is flat
(``data_dir = "/var/lib/evalstream"``) or nested under an ``[evalstream]``
table; an environment variable is the field name in upper case with the
``EVALSTREAM_`` prefix, lists comma-separated (``EVALSTREAM_TOP_K=1,5,10``).
Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from evalstream.service.engine.config import BACKENDS, DEFAULT_INVERSE_TEMPERATURES, EngineConfig
from evalstream.service.engine.registry import direction
from evalstream.service.settings_sources import coerce_all, read_file
from evalstream.service.store.base import StorePolicy
from evalstream.service.store.url import store_kind

ENV_PREFIX = "EVALSTREAM_"
MIB = 1 << 20
# Score dtypes the wire carries, as warm_kernels names them.
WARM_DTYPES = ("float32", "float16", "bfloat16")


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class Settings:
    """Everything the server reads at start. Immutable: a change needs a restart."""

    grpc_address: str = field(
        default="127.0.0.1:50051",
        metadata=_doc(
            "host:port the gRPC server listens on; loopback by default because auth is off by default"
        ),
    )
    metrics_address: str = field(
        default="127.0.0.1:9464",
        metadata=_doc("host:port of the Prometheus /metrics endpoint; empty disables it"),
    )
    data_dir: str = field(
        default="./evalstream-data",
        metadata=_doc("directory of the SQLite database (WAL) and the per-sample records files"),
    )
    device: str = field(default="auto", metadata=_doc('"auto" (CUDA when available), "cpu" or "cuda:N"'))
    torch_threads: int = field(
        default=1, metadata=_doc("torch intra-op threads; 1 leaves the other core to gRPC and SQLite")
    )
    worker_threads: int = field(
        default=2, metadata=_doc("threads decoding and reducing chunks off the event loop")
    )
    primary_metric: str = field(
        default="nll", metadata=_doc("metric CompareModels ranks by when the request names none")
    )
    secondary_metric: str = field(
        default="accuracy_top1", metadata=_doc("metric CompareModels reports next to the primary one")
    )
    top_k: tuple[int, ...] = field(default=(1, 5), metadata=_doc("k of every reported top-k accuracy"))
    num_bins: int = field(default=15, metadata=_doc("calibration (reliability) bins"))
    inverse_temperatures: tuple[float, ...] = field(
        default=DEFAULT_INVERSE_TEMPERATURES,
        metadata=_doc("temperature grid as 1/T, increasing, must contain 1.0"),
    )
    block_rows: int = field(default=1024, metadata=_doc("rows per fused engine pass"))
    engine_backend: str = field(
        default="auto",
        metadata=_doc(
            '"auto" (compiled on CPU where a C++ compiler is found, else eager), "eager" or "compiled" '
            "(on the CPU one native loop a row, service/engine/rest_moments.c, built once with the system "
            "C compiler in under a second and cached, ~2.7x the eager throughput; TorchInductor where that "
            "cannot be built and on CUDA, whose first chunk of each class count and score dtype compiles: "
            "~3.5 s with inductor's disk cache warm, ~11 s cold, measured on 2 cores)"
        ),
    )
    warm_kernels: tuple[str, ...] = field(
        default=(),
        metadata=_doc(
            'compiled engine: kernels to compile at start, as "classes:dtype" '
            "(e.g. 3000:float32,1000:bfloat16; dtype float32, float16 or bfloat16), so the first stream "
            "of that class count and score dtype finds its kernel ready; empty compiles only a "
            "throwaway kernel (the compiler's own start-up). On the CPU the native row pass is one "
            "library for every class count and dtype, built by the first of them"
        ),
    )
    max_staging_bytes: int = field(
        default=512 * MIB,
        metadata=_doc(
            "bytes of staging blocks all streams together may hold; a stream that cannot get a block "
            "stops reading (gRPC flow control holds the client back) until one frees up"
        ),
    )
    max_message_bytes: int = field(
        default=8 * MIB, metadata=_doc("largest gRPC message accepted; larger ones end the stream")
    )
    max_chunk_rows: int = field(
        default=65536, metadata=_doc("largest chunk in samples; larger chunks are rejected (chunk_too_large)")
    )
    grpc_stream_window_bytes: int = field(
        default=MIB,
        metadata=_doc(
            "fixed HTTP/2 flow-control window of each stream (grpc.http2.lookahead_bytes, with "
            "grpc.http2.bdp_probe off): bounds what gRPC itself buffers per stream, outside "
            "max_staging_bytes, to about this plus the message being received (64 streams: peak RSS "
            "-37%, same throughput; docs/performance.md); 0 keeps gRPC's own window, which grows with "
            "the measured bandwidth-delay product"
        ),
    )
    grpc_bdp_probe: bool = field(
        default=True,
        metadata=_doc(
            "let gRPC grow the HTTP/2 windows from bandwidth-delay probes "
            "(ignored, i.e. off, when grpc_stream_window_bytes is set)"
        ),
    )
    max_open_shards: int = field(
        default=1024, metadata=_doc("shards streaming at once on this server (RESOURCE_EXHAUSTED beyond)")
    )
    max_open_shards_per_connection: int = field(
        default=64, metadata=_doc("shards streaming at once from one client connection")
    )
    max_samples_per_evaluation: int = field(
        default=100_000_000, metadata=_doc("samples one evaluation may hold (chunks beyond are rejected)")
    )
    retention_keep_latest: int = field(
        default=5,
        metadata=_doc(
            "per-sample records are kept for the latest N finalized evaluations of each run/model/split "
            "(and pinned ones); older ones keep their metrics only; 0 keeps all"
        ),
    )
    store_url: str = field(
        default="",
        metadata=_doc(
            "where state lives: empty or sqlite:///DIR is the embedded SQLite store (in data_dir when "
            "empty; one server process); postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE is a PostgreSQL "
            "database any number of replicas share (docs/scaling.md)"
        ),
    )
    finalize_claim_s: float = field(
        default=30.0,
        metadata=_doc(
            "PostgreSQL store: how long a replica's claim to finalize an evaluation lives without renewal; "
            "another replica takes over a finalize this long after its finalizer died or stalled"
        ),
    )
    shard_lease_s: float = field(
        default=5.0,
        metadata=_doc(
            "PostgreSQL store: how long a stream's hold on its rank lives without renewal (renewed every "
            "third of it while the stream lives); another replica accepts the rank this long after the "
            "replica streaming it died"
        ),
    )
    max_wait_s: float = field(
        default=30.0,
        metadata=_doc(
            "longest a GetEvaluation long poll (its wait field, what result() and wait_for send) holds "
            "the call until the evaluation is finalized; a longer wait is cut to this; 0 answers at once"
        ),
    )
    max_connection_age_s: float = field(
        default=0.0,
        metadata=_doc(
            "close client connections after this many seconds (streams resume on a new one), so clients "
            "re-resolve a dns:/// target and spread over replicas added since; 0 keeps them open"
        ),
    )
    store_synchronous: str = field(
        default="normal",
        metadata=_doc(
            'SQLite synchronous mode: "normal" survives a process crash (SIGKILL), '
            '"full" also survives power loss at one fsync per commit'
        ),
    )
    compare_bootstrap_replicates: int = field(
        default=1000, metadata=_doc("bootstrap replicates of CompareModels")
    )
    compare_confidence_level: float = field(default=0.95, metadata=_doc("confidence level of CompareModels"))
    compare_tie_tolerance: float = field(
        default=1e-9, metadata=_doc("primary-metric difference below which candidates count as tied")
    )
    compare_recommendation: str = field(
        default="on",
        metadata=_doc(
            '"on" (CompareModels leads with the model to pick, docs/compare.md), "advisory" (reported, '
            'the primary metric stays the headline) or "off"; a request may choose'
        ),
    )
    exporter_max_series: int = field(
        default=1000, metadata=_doc("most run/model/split series the quality exporter publishes")
    )
    shutdown_grace_s: float = field(
        default=10.0, metadata=_doc("seconds SIGTERM waits for open streams before cancelling them")
    )
    tls_cert_file: str = field(default="", metadata=_doc("PEM server certificate; empty serves plaintext"))
    tls_key_file: str = field(default="", metadata=_doc("PEM private key of tls_cert_file"))
    tls_client_ca_file: str = field(
        default="", metadata=_doc("PEM CA bundle; when set, clients must present a certificate (mTLS)")
    )
    auth_tokens_file: str = field(
        default="", metadata=_doc("file of bearer tokens (one a line) allowed every RPC; empty disables auth")
    )
    auth_read_only_tokens_file: str = field(
        default="", metadata=_doc("file of bearer tokens allowed Get/List/Compare only")
    )
    metrics_tls_cert_file: str = field(
        default="", metadata=_doc("PEM certificate for the /metrics endpoint; empty serves plain HTTP")
    )
    metrics_tls_key_file: str = field(default="", metadata=_doc("PEM private key of metrics_tls_cert_file"))
    metrics_tls_client_ca_file: str = field(
        default="", metadata=_doc("PEM CA bundle; when set, scrapers must present a certificate")
    )
    log_level: str = field(default="INFO", metadata=_doc("Python logging level"))

    def __post_init__(self) -> None:
        positive = (
            "worker_threads",
            "max_message_bytes",
            "max_chunk_rows",
            "max_staging_bytes",
            "max_open_shards",
            "max_open_shards_per_connection",
            "max_samples_per_evaluation",
            "compare_bootstrap_replicates",
            "exporter_max_series",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"setting {name} must be >= 1, got {getattr(self, name)}")
        if self.finalize_claim_s <= 0 or self.shard_lease_s <= 0 or self.max_connection_age_s < 0:
            raise ValueError("finalize_claim_s and shard_lease_s must be > 0 and max_connection_age_s >= 0")
        if self.torch_threads < 0 or self.retention_keep_latest < 0 or self.shutdown_grace_s < 0:
            raise ValueError("torch_threads, retention_keep_latest and shutdown_grace_s must be >= 0")
        if self.max_wait_s < 0:
            raise ValueError(
                f"max_wait_s must be >= 0 (0 answers GetEvaluation at once), got {self.max_wait_s}"
            )
        if self.engine_backend not in BACKENDS:
            choices = ", ".join(BACKENDS)
            raise ValueError(f"engine_backend must be one of {choices}, got {self.engine_backend!r}")
        store_kind(self.store_url)  # ValueError naming the accepted forms
        if self.store_synchronous not in ("normal", "full"):
            raise ValueError(f'store_synchronous must be "normal" or "full", got {self.store_synchronous!r}')
        if not 0.0 < self.compare_confidence_level < 1.0:
            raise ValueError(
                f"compare_confidence_level must be in (0, 1), got {self.compare_confidence_level}"
            )
        if self.grpc_stream_window_bytes < 0:
            raise ValueError(f"grpc_stream_window_bytes must be >= 0, got {self.grpc_stream_window_bytes}")
        self.warm_kernel_specs()  # validates warm_kernels
        if self.compare_recommendation not in ("off", "advisory", "on"):
            raise ValueError(
                'compare_recommendation must be "off", "advisory" or "on", '
                f"got {self.compare_recommendation!r}"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        self.engine_config()  # validates top_k, bins, temperature grid
        for name in ("primary_metric", "secondary_metric"):
            try:
                direction(getattr(self, name), self.top_k)
            except ValueError as exc:
                raise ValueError(f"setting {name}: {exc}") from None

    @property
    def primary_higher_is_better(self) -> bool:
        """Direction of the primary metric, from the metric registry (nll: lower is better)."""
        return direction(self.primary_metric, self.top_k)

    def warm_kernel_specs(self) -> list[tuple[int, str]]:
        """``warm_kernels`` as (class count, score dtype name) pairs; ValueError naming a bad entry."""
        out = []
        for entry in self.warm_kernels:
            classes, sep, dtype = entry.strip().partition(":")
            dtype = dtype.strip()
            if not sep or not classes.strip().isdigit() or int(classes) < 2 or dtype not in WARM_DTYPES:
                raise ValueError(
                    f"warm_kernels entry {entry!r} must be CLASSES:DTYPE with CLASSES >= 2 and DTYPE one of "
                    f"{', '.join(WARM_DTYPES)} (e.g. 3000:float32)"
                )
            out.append((int(classes), dtype))
        return out

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir)

    def store_policy(self) -> StorePolicy:
        """The limits and retention the store applies to every write."""
        return StorePolicy(self.max_samples_per_evaluation, self.retention_keep_latest)

    def engine_config(self) -> EngineConfig:
        return EngineConfig(
            top_k=self.top_k,
            num_bins=self.num_bins,
            inverse_temperatures=self.inverse_temperatures,
            device=self.device,
            block_rows=self.block_rows,
            intra_op_threads=self.torch_threads,
            backend=self.engine_backend,
        )

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Defaults, then the file at ``path`` (.toml, .yaml/.yml), then ``EVALSTREAM_*``, then overrides."""
        values: dict[str, Any] = {}
        known = _field_types()
        if path is not None:
            values.update(coerce_all(read_file(Path(path)), known, source=str(path)))
        env = os.environ if env is None else env
        # Other EVALSTREAM_* variables (the client's, the token lists read by auth.py) are not settings.
        from_env = {
            key[len(ENV_PREFIX) :].lower(): value
            for key, value in env.items()
            if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in known
        }
        values.update(coerce_all(from_env, known, source="environment (EVALSTREAM_*)"))
        values.update(coerce_all(overrides, known, source="overrides"))
        return cls(**values)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(name, default, doc) of every setting: the source of docs/configuration.md."""
        out = []
        for f in fields(cls):
            default = f.default
            shown = ",".join(str(v) for v in default) if isinstance(default, tuple) else str(default)
            out.append((f.name, shown, str(f.metadata.get("doc", ""))))
        return out


_HINTS: dict[str, Any] = {}


def _field_types() -> dict[str, Any]:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(Settings))
    return _HINTS


def replace(settings: Settings, **changes: Any) -> Settings:
    """A copy with some settings changed (validated like a fresh load)."""
    return dataclasses.replace(settings, **changes)
