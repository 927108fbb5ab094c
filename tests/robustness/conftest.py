"""Robustness-test plumbing: the slow switch, the repository root on sys.path (for ``bench.load``),
and one real server on loopback per module."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SLOW = os.environ.get("EVALSTREAM_SLOW_TESTS", "") not in ("", "0")
HERE = os.path.dirname(os.path.abspath(__file__))
NUM_CLASSES = 10
MAX_CHUNK_ROWS = 64
MAX_MESSAGE_BYTES = 256 * 1024


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if SLOW:
        return
    skip = pytest.mark.skip(reason="slow; set EVALSTREAM_SLOW_TESTS=1 to run it")
    for item in items:
        if "slow" in item.keywords and str(item.path).startswith(HERE):
            item.add_marker(skip)


def robust_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": str(data_dir),
        "grpc_address": "127.0.0.1:0",
        "metrics_address": "",
        "device": "cpu",
        "max_chunk_rows": MAX_CHUNK_ROWS,
        "max_message_bytes": MAX_MESSAGE_BYTES,
        "shutdown_grace_s": 0.5,
        # Settings.load(env={}) ignores the environment, so the suite's engine choice is passed on here
        # (tests/conftest.py: eager, since the compiled kernel costs seconds to build in each process).
        "engine_backend": os.environ.get("EVALSTREAM_ENGINE_BACKEND", "eager"),
    }
    values.update(overrides)
    return Settings.load(env={}, **values)


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return robust_settings(tmp_path_factory.mktemp("robust") / "data")


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[BackgroundServer]:
    with BackgroundServer(settings) as srv:
        yield srv
