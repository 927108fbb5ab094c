"""A gRPC channel to the shared loopback server (tests/conftest.py) for the service tests."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from evalstream.service.server import BackgroundServer
from tests.support.servers import small_settings

__all__ = ["NUM_CLASSES", "small_settings"]

NUM_CLASSES = 50


@pytest.fixture
def channel(server: BackgroundServer) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as ch:
        yield ch
