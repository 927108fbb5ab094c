"""The evalstream server process: grpc.aio on one event loop, health, reflection, Prometheus, signals.

``run(settings)`` is what ``evalstream serve`` and ``python -m evalstream.service.server``
call: it blocks until SIGTERM/SIGINT, then stops accepting calls, lets open
streams finish for ``shutdown_grace_s``, waits for every commit already
started, closes the store and returns 0. ``BackgroundServer`` runs the same
server on its own thread and loop, for tests, demos and notebooks.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import torch
import yaml
from grpc_health.v1 import _async as health_aio  # what grpc_health.v1.health exposes as .aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from evalstream.service import auth
from evalstream.service.export_gate import ExportGate, ExportingStore
from evalstream.service.exporter import QualityCollector
from evalstream.service.ingest import Coordinator
from evalstream.service.reduction import compiled_engine_note, inductor_cache_dir
from evalstream.service.servicer import EvalStreamServicer, add_to_server
from evalstream.service.settings import Settings
from evalstream.service.status import FinalizedSource, ProgressSource, StoreFinalized
from evalstream.service.store.base import Closeable
from evalstream.service.store.url import open_store, redacted
from evalstream.service.sweeper import ClaimingStore, FinalizeSweeper
from evalstream.service.telemetry import MetricsEndpoint, Telemetry, serve_metrics, split_address
from evalstream.v1 import service_pb2

log = logging.getLogger("evalstream.server")
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["EvalStreamService"].full_name


def _grpc_options(settings: Settings) -> list[tuple[str, Any]]:
    options: list[tuple[str, Any]] = [
        *_window_options(settings),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        # Never share a port silently with another server (a stale instance would get half the streams).
        ("grpc.so_reuseport", 0),
        # Notice dead client connections, so a rank's lease frees up soon after its job dies.
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]
    if settings.max_connection_age_s > 0:
        # Clients re-resolve and reconnect (to any replica) when a connection ages out; a stream cut by
        # it resumes from the committed watermark like any reconnect.
        age_ms = int(settings.max_connection_age_s * 1000)
        options += [("grpc.max_connection_age_ms", age_ms), ("grpc.max_connection_age_grace_ms", age_ms)]
    return options


def _window_options(settings: Settings) -> list[tuple[str, Any]]:
    """HTTP/2 flow control: what gRPC may buffer per stream before the servicer reads it.

    gRPC's default window starts at 64 KiB and grows with bandwidth-delay probes; with many
    streams the grown windows hold tens of MiB per connection outside ``max_staging_bytes``. A
    fixed window (probing off) bounds it: per stream, one message being received plus the window.
    """
    if settings.grpc_stream_window_bytes > 0:
        return [
            ("grpc.http2.lookahead_bytes", settings.grpc_stream_window_bytes),
            ("grpc.http2.bdp_probe", 0),
        ]
    return [] if settings.grpc_bdp_probe else [("grpc.http2.bdp_probe", 0)]


def check_startup(settings: Settings) -> None:
    """Everything startup would refuse in the security settings, checked before anything starts.

    Reads the TLS and token files and checks the tokens (``auth.SecurityConfigError``, a
    ValueError, naming the setting and the file); opens no port, file for writing or thread, so
    ``evalstream serve`` can end with one line instead of a traceback and a half-started server.
    """
    auth.server_credentials(settings)
    auth.interceptors(settings)
    auth.metrics_tls_options(settings)


def _local_target(host: str, port: int) -> str:
    """An address clients on this machine can dial for a server bound to ``host``."""
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = "127.0.0.1"
    return f"{host}:{port}"


class Server:
    """One running evalstream server; create, ``await start()``, ``await stop()`` on one loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.telemetry = Telemetry()
        self.store = open_store(
            settings.store_url,
            settings.data_dir,
            settings.store_synchronous,
            settings.store_policy(),
            settings.finalize_claim_s,
            settings.shard_lease_s,
        )
        self.coordinator = Coordinator(self.store, settings, self.telemetry)
        # Replicas sharing a store finish each other's interrupted finalizes (service/sweeper.py).
        self.sweeper = (
            FinalizeSweeper(self.store, self.coordinator.finalize, settings.finalize_claim_s / 3)
            if isinstance(self.store, ClaimingStore)
            else None
        )
        # Replicas: finalizations on other replicas reach this one's waiters (store/postgres_listen.py).
        self.listener: Closeable | None = None
        self.health = health_aio.HealthServicer()
        self.metrics: MetricsEndpoint | None = None
        self.port = 0
        self.target = ""
        self._grpc: grpc.aio.Server | None = None
        # The engine warm-up started by start() (seconds it took), None with the eager engine.
        self.warm_up: asyncio.Future[float] | None = None

    async def start(self) -> None:
        s = self.settings
        # Security files and tokens first: a mistake there stops start-up before any work begins.
        on_denied = lambda method, code: self.telemetry.rpc_errors.labels(  # noqa: E731
            method=method, code=code.name
        ).inc()
        interceptors = auth.interceptors(s, on_denied=on_denied)
        creds = auth.server_credentials(s)
        if s.torch_threads > 0:
            torch.set_num_threads(s.torch_threads)
        waiters = self.coordinator.waiters
        waiters.start()  # polls the store for waiters until a listener, if the store has one, connects
        self.listener = self.store.finalization_listener(waiters.announce, waiters.listening)
        if self.listener is None:
            waiters.in_process_only()
        await self.coordinator.recover()
        compiled = self.coordinator.engine_backend == "compiled"
        # Looked up before the warm-up thread imports the compiler (two threads importing inductor race).
        cache = inductor_cache_dir() if compiled else ""
        warm = [(c, getattr(torch, dtype)) for c, dtype in s.warm_kernel_specs()]
        self.warm_up = self.coordinator.warm_up(warm)
        server = grpc.aio.server(interceptors=interceptors, options=_grpc_options(s))
        add_to_server(EvalStreamServicer(self.coordinator), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        auth.warn_if_exposed(s, s.grpc_address)
        if creds is None:
            self.port = server.add_insecure_port(s.grpc_address)
        else:
            self.port = server.add_secure_port(s.grpc_address, creds)
        if self.port == 0:
            raise RuntimeError(f"could not bind the gRPC port {s.grpc_address}")
        host = s.grpc_address.rsplit(":", 1)[0]
        self.target = _local_target(host, self.port)
        await server.start()
        self._grpc = server
        for name in ("", SERVICE_NAME):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        if self.sweeper is not None:
            self.sweeper.start()
        if s.metrics_address:
            finalized: FinalizedSource = StoreFinalized(self.store)
            progress: ProgressSource = self.coordinator
            if isinstance(self.store, ExportingStore):  # replicas: one exports the evaluation gauges
                finalized = progress = ExportGate(self.store, finalized, progress)
            self.telemetry.registry.register(
                QualityCollector(finalized, progress, max_series=s.exporter_max_series)
            )
            self.metrics = self._serve_metrics()
        log.info(
            "evalstream serving grpc=%s metrics=%s store=%s engine=%s",
            self.target,
            self.metrics_target or "off",
            redacted(s.store_url) if s.store_url else os.path.abspath(s.data_dir),
            self.coordinator.engine_backend,
        )
        if compiled:
            log.info("%s", compiled_engine_note(s.device, s.warm_kernels, cache))

    def _serve_metrics(self) -> MetricsEndpoint:
        tls = auth.metrics_tls_options(self.settings)
        if not tls:
            return serve_metrics(self.settings.metrics_address, self.telemetry.registry)
        host, port = split_address(self.settings.metrics_address)
        http, thread = start_http_server(port, addr=host, registry=self.telemetry.registry, **tls)
        return MetricsEndpoint(http, thread)

    @property
    def metrics_target(self) -> str:
        return "" if self.metrics is None else _local_target(self.metrics.host, self.metrics.port)

    async def wait(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_for_termination()

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, give open calls ``grace`` seconds, finish started commits, close the store."""
        grace = self.settings.shutdown_grace_s if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.coordinator.waiters.close()  # long polls answer now; their clients ask again elsewhere
        if self.sweeper is not None:
            await self.sweeper.stop()
        if self._grpc is not None:
            await self._grpc.stop(grace)
        await self.coordinator.drain()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.coordinator.close_executors)
        if self.listener is not None:
            await loop.run_in_executor(None, self.listener.close)
            self.listener = None
        self.store.close()
        if self.metrics is not None:
            self.metrics.close()
            self.metrics = None
        log.info("evalstream stopped")


async def _serve(settings: Settings) -> int:
    server = Server(settings)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(server.wait())
    stopper = asyncio.ensure_future(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    log.info("shutting down: no new calls, finishing in-flight chunks")
    await server.stop()
    stopper.cancel()
    waiter.cancel()
    return 0


def serve_checked(load: Callable[[], Settings], prog: str) -> int:
    """Load and check the settings, then serve; a configuration mistake is one line and status 2.

    ``load`` builds the settings (file, environment, command-line overrides). Unknown keys, bad
    values, unreadable files and short tokens all raise ValueError or OSError before anything
    starts (no store, port or warm-up thread), so the operator sees the mistake, not a traceback.
    """
    try:
        settings = load()
        check_startup(settings)
    except (ValueError, OSError, yaml.YAMLError) as exc:
        print(f"{prog}: configuration error: {_one_line(exc)}", file=sys.stderr)
        return 2
    return run(settings)


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or exc}: {exc.filename}"
    return " ".join(str(exc).split())


def run(settings: Settings) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code (0 after a graceful stop)."""
    logging.basicConfig(
        level=getattr(logging, settings.log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return asyncio.run(_serve(settings))


class BackgroundServer:
    """The server on a background thread with its own event loop (tests, demos, notebooks).

    ``with BackgroundServer(Settings.load(grpc_address="127.0.0.1:0", ...)) as srv:``
    then dial ``srv.target``. ``start()`` returns once the server accepts calls
    and re-raises any startup error; ``stop()`` is the graceful shutdown.
    """

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        if settings is None:
            overrides.setdefault("grpc_address", "127.0.0.1:0")
            overrides.setdefault("metrics_address", "")
            settings = Settings.load(**overrides)
        self.settings = settings
        self.server: Server | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def target(self) -> str:
        if self.server is None:
            raise RuntimeError("server not started")
        return self.server.target

    @property
    def port(self) -> int:
        return 0 if self.server is None else self.server.port

    @property
    def metrics_target(self) -> str:
        return "" if self.server is None else self.server.metrics_target

    def start(self) -> BackgroundServer:
        self._thread = threading.Thread(target=self._main, name="evalstream-server", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._amain())
        finally:
            loop.close()

    async def _amain(self) -> None:
        self._stopped = asyncio.Event()
        try:
            self.server = Server(self.settings)
            await self.server.start()
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        await self._stopped.wait()

    def stop(self, grace: float | None = None) -> None:
        """Graceful stop; safe to call twice."""
        loop, server, thread = self._loop, self.server, self._thread
        if loop is None or server is None or thread is None or not thread.is_alive():
            return

        async def _stop() -> None:
            await server.stop(grace)
            assert self._stopped is not None
            self._stopped.set()

        asyncio.run_coroutine_threadsafe(_stop(), loop).result()
        thread.join()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop(grace=0.5)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m evalstream.service.server", description=__doc__)
    parser.add_argument(
        "--config", default=os.environ.get("EVALSTREAM_CONFIG"), help="TOML or YAML settings file"
    )
    args = parser.parse_args(argv)
    return serve_checked(lambda: Settings.load(args.config), parser.prog)


if __name__ == "__main__":
    sys.exit(main())
