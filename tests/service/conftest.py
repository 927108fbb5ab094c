"""A real server on loopback (port 0) with its SQLite store in the test's tmp_path."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings

NUM_CLASSES = 50


def small_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": str(data_dir),
        "grpc_address": "127.0.0.1:0",
        "metrics_address": "",
        "device": "cpu",
        "worker_threads": 2,
        "shutdown_grace_s": 1.0,
        # tests/conftest.py: eager unless the environment (or a test) says otherwise.
        "engine_backend": os.environ.get("EVALSTREAM_ENGINE_BACKEND", "eager"),
    }
    values.update(overrides)
    return Settings.load(env={}, **values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return small_settings(tmp_path / "data")


@pytest.fixture
def server(settings: Settings) -> Iterator[BackgroundServer]:
    with BackgroundServer(settings) as srv:
        yield srv


@pytest.fixture
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch
