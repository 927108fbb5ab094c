"""Fixtures the replica tests share."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.replicas.cluster import Finalizations


@pytest.fixture
def finalizations(postgres_url: str) -> Iterator[Finalizations]:
    """A LISTEN connection that records every finalize the replicas announce."""
    listener = Finalizations(postgres_url)
    yield listener
    listener.close()
