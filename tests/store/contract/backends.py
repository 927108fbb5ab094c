"""The store backends the contract suite runs against, each behind one small factory.

A backend factory owns one store location (a directory, a database) for one
test: ``open`` opens the store there (created empty the first time), ``crash``
hands back what the next process finds after the current one is killed at this
moment, and ``close`` releases everything. A new backend joins the suite by
adding its factory to ``BACKENDS``; one that needs a server it cannot find
raises ``pytest.skip`` from its constructor.
"""

from __future__ import annotations

import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

from evalstream.service.store import SqliteStore, Store, StorePolicy


class Backend(ABC):
    """One store location for one test."""

    name: str

    def __init__(self) -> None:
        self.opened: list[Store] = []

    @abstractmethod
    def _open(self, policy: StorePolicy) -> Store: ...

    @abstractmethod
    def _crash_image(self, store: Store) -> None:
        """Make this location what a process killed now (all calls returned) would leave behind."""

    def open(self, policy: StorePolicy | None = None) -> Store:
        store = self._open(policy or StorePolicy())
        self.opened.append(store)
        return store

    def reopen(self, store: Store, policy: StorePolicy | None = None) -> Store:
        """A clean restart: close the store, open the same location again."""
        store.close()
        return self.open(policy or store.policy)

    def crash(self, store: Store, policy: StorePolicy | None = None) -> Store:
        """A restart after a kill: the location as the kill left it, opened by a new store."""
        self._crash_image(store)
        return self.open(policy or store.policy)

    def close(self) -> None:
        for store in self.opened:
            store.close()


class SqliteBackend(Backend):
    """SQLite under a temporary directory. A crash image is a copy of the database file, its WAL
    and the records files taken while the store is open, without a checkpoint or a close: what
    SIGKILL leaves (a committed transaction is in the WAL; the -shm index is rebuilt)."""

    name = "sqlite"

    def __init__(self, tmp_path: Path) -> None:
        super().__init__()
        self._root = tmp_path
        self._generation = 0
        self.data_dir = tmp_path / "store-0"

    def _open(self, policy: StorePolicy) -> Store:
        return SqliteStore(self.data_dir, policy=policy)

    def _crash_image(self, store: Store) -> None:
        assert isinstance(store, SqliteStore)
        store.wait_reclaimed(timeout=30)  # the background reclaim is a write too: let it land first
        self._generation += 1
        image = self._root / f"store-{self._generation}"
        image.mkdir()
        for name in ("evalstream.db", "evalstream.db-wal"):
            if (self.data_dir / name).exists():
                shutil.copy2(self.data_dir / name, image / name)
        shutil.copytree(self.data_dir / "records", image / "records")
        self.data_dir = image


# name -> factory of a backend for one test, given the test's tmp_path.
BACKENDS: dict[str, Callable[[Path], Backend]] = {"sqlite": SqliteBackend}
