"""The private PostgreSQL the store tests run on: durable, loopback only, and gone afterwards.

These guard the fixture itself: a server that ran with fsync off would make every crash test
meaningless, one listening beyond loopback would break the project's network rule, and one left
running would leak into the next test run.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import psycopg
import pytest

from tests.support.postgres import PostgresServer, running_postgres


def test_server_is_durable_and_loopback_only(postgres_server: PostgresServer, postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        settings: dict[str, str] = dict(
            conn.execute(
                "SELECT name, setting FROM pg_settings WHERE name IN "
                "('fsync', 'synchronous_commit', 'listen_addresses', 'unix_socket_directories')"
            ).fetchall()
        )
    assert settings["fsync"] == "on"
    assert settings["synchronous_commit"] == "on"
    assert settings["listen_addresses"] == "127.0.0.1"
    assert Path(settings["unix_socket_directories"]) == postgres_server.socketdir


def test_each_test_gets_its_own_empty_database(postgres_server: PostgresServer, postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        name = conn.execute("SELECT current_database()").fetchone()
    assert tables == (0,)
    assert name is not None and name[0] != "postgres"


def test_restart_keeps_committed_rows(postgres_server: PostgresServer, postgres_url: str) -> None:
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE t (v int)")
        conn.execute("INSERT INTO t VALUES (7)")
    postgres_server.kill()  # a crash: only what was committed (and synced) survives
    postgres_server.start()
    with psycopg.connect(postgres_url) as conn:
        assert conn.execute("SELECT v FROM t").fetchall() == [(7,)]


def test_closing_stops_the_server_and_removes_its_directory() -> None:
    with running_postgres() as server:
        pid = server.process.pid if server.process else 0
        workdir = server.workdir
        url = server.create_database(f"t_{uuid.uuid4().hex[:8]}")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    assert not workdir.exists()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(url, connect_timeout=2)
