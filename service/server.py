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
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import grpc
import grpc.aio
import torch
from grpc_health.v1 import _async as health_aio  # what grpc_health.v1.health exposes as .aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from evalstream.service import auth
from evalstream.service.exporter import QualityCollector
from evalstream.service.ingest import Coordinator
from evalstream.service.servicer import EvalStreamServicer, add_to_server
from evalstream.service.settings import Settings
from evalstream.service.status import StoreFinalized
from evalstream.service.store import SqliteStore
from evalstream.service.telemetry import MetricsEndpoint, Telemetry, serve_metrics, split_address
from evalstream.v1 import service_pb2

log = logging.getLogger("evalstream.server")
SERVICE_NAME = service_pb2.DESCRIPTOR.services_by_name["EvalStreamService"].full_name


def _grpc_options(settings: Settings) -> list[tuple[str, Any]]:
    return [
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
        self.store = SqliteStore(settings.data_path, settings.store_synchronous, settings.store_policy())
        self.coordinator = Coordinator(self.store, settings, self.telemetry)
        self.health = health_aio.HealthServicer()
        self.metrics: MetricsEndpoint | None = None
        self.port = 0
        self.target = ""
        self._grpc: grpc.aio.Server | None = None

    async def start(self) -> None:
        s = self.settings
        if s.torch_threads > 0:
            torch.set_num_threads(s.torch_threads)
        await self.coordinator.recover()
        self.coordinator.warm_up()
        on_denied = lambda method, code: self.telemetry.rpc_errors.labels(  # noqa: E731
            method=method, code=code.name
        ).inc()
        server = grpc.aio.server(
            interceptors=auth.interceptors(s, on_denied=on_denied), options=_grpc_options(s)
        )
        add_to_server(EvalStreamServicer(self.coordinator), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        creds = auth.server_credentials(s)
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
        if s.metrics_address:
            self.telemetry.registry.register(
                QualityCollector(
                    StoreFinalized(self.store), self.coordinator, max_series=s.exporter_max_series
                )
            )
            self.metrics = self._serve_metrics()
        log.info(
            "evalstream serving grpc=%s metrics=%s data_dir=%s engine=%s",
            self.target,
            self.metrics_target or "off",
            os.path.abspath(s.data_dir),
            self.coordinator.engine_backend,
        )
        if self.coordinator.engine_backend == "compiled":
            log.info(
                "compiled engine: the first chunk of each class count and score dtype compiles its "
                "kernel (~1-3 s with inductor's disk cache warm, ~10 s cold); engine_backend=eager avoids it"
            )

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
        if self._grpc is not None:
            await self._grpc.stop(grace)
        await self.coordinator.drain()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.coordinator.close_executors)
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
    return run(Settings.load(args.config))


if __name__ == "__main__":
    sys.exit(main())
