"""``store_url`` picks the store: SQLite by default (as before), PostgreSQL for replicas, a typo refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from evalstream.service.server import BackgroundServer, Server
from evalstream.service.settings import Settings
from evalstream.service.store.postgres import PostgresStore
from evalstream.service.store.sqlite import SqliteStore
from evalstream.service.store.url import redacted, sqlite_dir, store_kind
from tests.support.servers import small_settings


def _server(srv: BackgroundServer) -> Server:
    assert srv.server is not None
    return srv.server


def test_empty_url_is_sqlite_in_data_dir(tmp_path: Path) -> None:
    with BackgroundServer(small_settings(tmp_path / "data")) as srv:
        assert isinstance(_server(srv).store, SqliteStore)
    assert (tmp_path / "data" / "evalstream.db").exists()


def test_sqlite_url_names_the_directory(tmp_path: Path) -> None:
    assert sqlite_dir(f"sqlite://{tmp_path}/elsewhere", "ignored") == tmp_path / "elsewhere"
    assert sqlite_dir("sqlite:///var/lib/evalstream", "ignored") == Path("/var/lib/evalstream")
    assert sqlite_dir("sqlite:relative/dir", "ignored") == Path("relative/dir")
    with BackgroundServer(small_settings(tmp_path / "data", store_url=f"sqlite://{tmp_path}/s")) as srv:
        assert isinstance(_server(srv).store, SqliteStore)
    assert (tmp_path / "s" / "evalstream.db").exists()


def test_postgresql_url_opens_the_shared_store(tmp_path: Path, postgres_url: str) -> None:
    assert store_kind(postgres_url) == "postgresql"
    with BackgroundServer(small_settings(tmp_path / "data", store_url=postgres_url)) as srv:
        assert isinstance(_server(srv).store, PostgresStore)
        assert _server(srv).sweeper is not None  # replicas finish each other's finalizes
    assert not (tmp_path / "data" / "evalstream.db").exists()


@pytest.mark.parametrize("url", ["mysql://db/evalstream", "evalstream.db", "postgresq://x"])
def test_an_unknown_store_url_is_refused_with_the_accepted_forms(url: str) -> None:
    with pytest.raises(ValueError, match=r"sqlite:///DIR .* postgresql://USER"):
        Settings.load(env={}, store_url=url)


def test_logs_never_show_the_password() -> None:
    assert redacted("postgresql://ev:s3cret@db:5432/ev") == "postgresql://ev:***@db:5432/ev"
    assert redacted("postgresql://ev@db/ev") == "postgresql://ev@db/ev"
