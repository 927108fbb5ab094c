"""Robustness-test plumbing: one real server on loopback per module."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from tests.support.servers import small_settings

ROOT = Path(__file__).resolve().parents[2]

NUM_CLASSES = 10
MAX_CHUNK_ROWS = 64
MAX_MESSAGE_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """``small_settings`` with this folder's tight limits."""
    return small_settings(
        tmp_path_factory.mktemp("robust") / "data",
        max_chunk_rows=MAX_CHUNK_ROWS,
        max_message_bytes=MAX_MESSAGE_BYTES,
        worker_threads=2,
        shutdown_grace_s=0.5,
    )


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[BackgroundServer]:
    with BackgroundServer(settings) as srv:
        yield srv
