"""The PostgreSQL backend of the store contract suite: a fresh database per test.

The database lives on the session's private PostgreSQL server (``tests/support/postgres.py``).
A crash image is the database as it stands: PostgreSQL commits are durable when the call
returns, so what a killed replica leaves is exactly what it committed. The store object is
abandoned (its pool closed without any further write) and a new one opened on the database.
"""

from __future__ import annotations

import uuid

from evalstream.service.store import Store, StorePolicy
from evalstream.service.store.postgres import PostgresStore
from tests.store.contract.backends import Backend
from tests.support.postgres import PostgresServer


class PostgresBackend(Backend):
    name = "postgresql"

    def __init__(self, server: PostgresServer) -> None:
        super().__init__()
        self._server = server
        self._dbname = f"t_{uuid.uuid4().hex[:16]}"
        self.url = server.create_database(self._dbname)

    def _open(self, policy: StorePolicy) -> Store:
        return PostgresStore(self.url, policy=policy, pool_size=4)

    def _crash_image(self, store: Store) -> None:
        assert isinstance(store, PostgresStore)
        store.close()

    def close(self) -> None:
        super().close()
        self._server.drop_database(self._dbname)
