"""A real PostgreSQL server for the tests: Debian's binaries, our own cluster, loopback only.

Why a private cluster rather than the system's: the tests must not depend on (or disturb) a
database someone else runs, must run side by side, and must leave nothing behind. So the
server is ``initdb``-ed into a temporary directory (as the ``postgres`` user when the tests run
as root: PostgreSQL refuses to run as root), listens on a free port of 127.0.0.1 and on a unix
socket inside that directory, keeps ``fsync`` on (commits are as durable as in production, so
crash tests mean something), and is stopped and removed when the session ends.

``PostgresServer`` also restarts and kills the server, for the tests of a database that goes
away mid-stream. Every test gets a fresh database of its own (``postgres_url``), dropped after it.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.ports import reserve_port

INSTALL_HINT = "tools/ensure_postgres.sh installs Debian's postgresql package"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
SUPERUSER = "postgres"


def bindir() -> Path | None:
    """The directory of ``initdb`` and ``postgres``: on PATH, or the newest of Debian's versions."""
    found = shutil.which("initdb")
    if found:
        return Path(found).parent
    versions = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3].split(".")[0])
    )
    return Path(versions[-1]).parent if versions else None


def _run_as() -> str | None:
    """The user the server runs as: ``postgres`` when we are root (the server refuses root)."""
    return SUPERUSER if os.geteuid() == 0 else None


class PostgresServer:
    """One private PostgreSQL cluster: ``start``, ``stop``, ``restart``, ``kill``, databases."""

    def __init__(self, workdir: Path, binaries: Path) -> None:
        self.workdir = workdir
        self.binaries = binaries
        self.datadir = workdir / "data"
        self.socketdir = workdir
        self.log = workdir / "postgres.log"
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._user = _run_as()
        if self._user is not None:
            entry = pwd.getpwnam(self._user)
            os.chown(workdir, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            [
                str(binaries / "initdb"),
                "-D",
                str(self.datadir),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-instructions",
            ],
            check=True,
            capture_output=True,
            user=self._user,
        )

    def url(self, dbname: str = "postgres") -> str:
        """A libpq URL for ``dbname`` over loopback TCP (what a replica elsewhere would use)."""
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> None:
        """Start the server (on a new free port the first time, the same one after a restart)."""
        if self.process is not None:
            raise RuntimeError("PostgreSQL is already running")
        # A fresh start tries new ports; a restart keeps its port and waits out what a killed server
        # leaves for a moment (its backends exiting, its shared memory detaching).
        attempts = 20 if self.port else 5
        for attempt in range(attempts):
            port = self.port or reserve_port()
            with open(self.log, "ab") as log:
                self.process = subprocess.Popen(
                    [
                        str(self.binaries / "postgres"),
                        "-D",
                        str(self.datadir),
                        "-p",
                        str(port),
                        "-k",
                        str(self.socketdir),
                        "-c",
                        "listen_addresses=127.0.0.1",
                        "-c",
                        "fsync=on",
                        "-c",
                        "max_connections=300",
                        "-c",
                        "shared_buffers=64MB",
                    ],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    user=self._user,
                    start_new_session=True,
                )
            if self._wait_ready(port):
                self.port = port
                return
            self._reap()
            if attempt + 1 == attempts:
                break
            time.sleep(0.5)
        raise RuntimeError(f"PostgreSQL did not start: {self.log.read_text(errors='replace')[-2000:]}")

    def _wait_ready(self, port: int) -> bool:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_S
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                return False
            try:
                with psycopg.connect(
                    f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres", connect_timeout=2
                ) as conn:
                    conn.execute("SELECT 1")
                return True
            except psycopg.OperationalError:
                time.sleep(0.1)
        return False

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back open transactions, checkpoint); SIGKILL if it hangs."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.kill()
        self.process = None

    def kill(self) -> None:
        """SIGKILL the whole server (postmaster and backends): a crash, recovered at the next start."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._reap()

    def _reap(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
            self.process = None
            # Backends of a killed postmaster exit on their own once they notice; give them a moment
            # so the next start does not find the shared memory still attached.
            time.sleep(0.2)

    def restart(self, down_s: float = 0.0) -> None:
        """Stop, stay down ``down_s`` seconds, start again on the same port."""
        self.stop()
        time.sleep(down_s)
        self.start()

    def create_database(self, name: str) -> str:
        """Create an empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop a database, ending any session still connected to it."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        """Stop the server and remove its directory."""
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    """A started private cluster, stopped and removed on exit; skips the test without binaries."""
    binaries = bindir()
    if binaries is None:
        pytest.skip(f"PostgreSQL is not installed ({INSTALL_HINT})")
    workdir = Path(tempfile.mkdtemp(prefix="evalstream-pg-"))
    server: PostgresServer | None = None
    try:
        server = PostgresServer(workdir, binaries)
        server.start()
        yield server
    finally:
        if server is not None:
            server.close()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole session (started on first use)."""
    with running_postgres() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for one test; dropped after it."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = postgres_server.create_database(name)
    try:
        yield url
    finally:
        if postgres_server.process is None:  # a test left it stopped
            postgres_server.start()
        postgres_server.drop_database(name)
