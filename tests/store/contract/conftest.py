"""Every contract test runs once per backend in ``BACKENDS``: ``backend`` is its location, ``store``
the store opened there with the default policy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from evalstream.service.store import Store
from tests.store.contract.backends import BACKENDS, Backend


@pytest.fixture(params=[*sorted(BACKENDS), "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    made: Backend
    if request.param == "postgresql":  # a database on the session's PostgreSQL server
        from tests.store.postgres_backend import PostgresBackend

        made = PostgresBackend(request.getfixturevalue("postgres_server"))
    else:
        made = BACKENDS[request.param](tmp_path)
    yield made
    made.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.open()
