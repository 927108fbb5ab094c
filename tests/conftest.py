"""Shared test configuration: the machine is small and shared, so torch runs on one thread.

Servers in tests run the eager engine backend unless a test asks for another: the compiled
backend compiles its kernel on the first chunk of every server process (seconds each), which
the many short-lived servers of the suite would pay again and again. Set at import, so servers
in this process and in subprocesses inherit it (fixtures that build settings with
``Settings.load(env={})`` pass it on themselves). Tests of the compiled backend name it explicitly.

The ``settings`` and ``server`` fixtures are the loopback server the client and service tests share
(port 0, SQLite under the test's tmp_path); folders that need another server override them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures for every folder)
from tests.support.servers import ENGINE_BACKEND_VARIABLE, small_settings

os.environ.setdefault(ENGINE_BACKEND_VARIABLE, "eager")


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread() -> None:
    torch.set_num_threads(1)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return small_settings(tmp_path / "data")


@pytest.fixture
def server(settings: Settings) -> Iterator[BackgroundServer]:
    with BackgroundServer(settings) as srv:
        yield srv
