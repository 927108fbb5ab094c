"""Server processes for fault tests: start ``python -m evalstream.service.server`` on a fixed port,
SIGKILL it, restart it on the same port and data directory, read its peak memory.

The port is fixed for the life of a ``ServerProcess`` so clients reconnect to the
restarted server exactly as a training job would. Output goes to a log file
(never a pipe a dead reader could fill), which is also how readiness is seen.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.support.ports import reserve_port

READY = re.compile(r"evalstream serving grpc=(\S+)")
CRASH_SERVER = Path(__file__).resolve().parent / "crash_server.py"
START_TIMEOUT_S = 90.0


def write_config(path: Path, data_dir: Path, port: int, **settings: Any) -> Path:
    """A TOML settings file for a loopback server with its store in ``data_dir``."""
    values: dict[str, Any] = {
        "data_dir": str(data_dir),
        "grpc_address": f"127.0.0.1:{port}",
        "metrics_address": "",
        "device": "cpu",
        "shutdown_grace_s": 2.0,
        "worker_threads": 2,
        # The suite's backend (tests/conftest.py), in the file: the server and the tests' reference
        # computations (Settings.load(config, env={}).engine_config()) then run the same one.
        "engine_backend": os.environ.get("EVALSTREAM_ENGINE_BACKEND", "eager"),
    }
    values.update(settings)
    lines = []
    for key, value in values.items():
        if isinstance(value, str):
            lines.append(f'{key} = "{value}"')
        elif isinstance(value, bool):
            lines.append(f"{key} = {str(value).lower()}")
        elif isinstance(value, list | tuple):
            lines.append(f"{key} = [{', '.join(str(v) for v in value)}]")
        else:
            lines.append(f"{key} = {value}")
    path.write_text("\n".join(lines) + "\n")
    return path


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of a live process: the most resident memory it has ever held."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmHWM for pid {pid}")


class ServerProcess:
    """One evalstream server subprocess; ``start()`` again after ``kill()`` restarts it in place.

    ``crash_at`` (for example ``"commit:after:7"``) starts it through
    ``crash_server.py``, which kills the process with SIGKILL at that point of
    the store protocol; see that file for the points.
    """

    def __init__(self, workdir: Path, port: int | None = None, **settings: Any) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir = workdir / "data"
        self.port = port or reserve_port()
        self.target = f"127.0.0.1:{self.port}"
        self.config = write_config(workdir / "evalstream.toml", self.data_dir, self.port, **settings)
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0
        self.crashes = 0  # exits by a crash point
        self.log_path = workdir / "server.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(
        self,
        crash_at: str = "",
        env: dict[str, str] | None = None,
        wait: bool = True,
        prefix: list[str] | None = None,
    ) -> None:
        """Start (or restart) the server; with ``wait`` return once it accepts calls.

        ``prefix`` runs the server under another command (e.g. ``setpriv`` to drop privileges).
        """
        if self.alive():
            raise RuntimeError("server is already running")
        cmd = [*(prefix or []), sys.executable]
        if crash_at:
            cmd += [str(CRASH_SERVER), "--crash-at", crash_at]
        else:
            cmd += ["-m", "evalstream.service.server"]
        cmd += ["--config", str(self.config)]
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("EVALSTREAM_")}
        child_env.update(env or {})
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        try:
            self.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=child_env, start_new_session=True
            )
        finally:
            log.close()
        self.starts += 1
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log_path.read_bytes()[self._log_offset :].decode(errors="replace")
            if READY.search(text):
                return
            if self.proc is not None and self.proc.poll() is not None:
                code = self.proc.returncode
                raise RuntimeError(f"server exited with {code} before serving:\n{text[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"server not serving within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_bytes()[-chars:].decode(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, exactly like an OOM kill or a lost node."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.kills += 1
        self.proc.wait(timeout=30)

    def wait_crash(self, timeout: float = 60.0) -> bool:
        """Wait for a crash point to fire; False if the process is still alive after ``timeout``."""
        assert self.proc is not None
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        if code != -signal.SIGKILL:
            raise RuntimeError(f"server exited with {code}, not by its crash point:\n{self.log_tail()}")
        self.crashes += 1
        return True

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM (graceful stop); returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def peak_rss(self) -> int:
        return peak_rss_bytes(self.pid)

    def close(self) -> None:
        """Whatever state it is in, leave no process behind."""
        if self.alive():
            self.kill()
