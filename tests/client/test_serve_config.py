"""``evalstream serve`` with a configuration mistake: one line on stderr, exit status 2, nothing started.

Each case runs the real console script in a fresh process. "Nothing started" is checked where it
shows: the data directory (the store creates it first thing) does not exist afterwards, and no
engine warm-up or compiler message reached stderr (the warm-up thread would have been running).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXE = shutil.which("evalstream", path=str(Path(sys.executable).parent)) or "evalstream"
PREFIX = "evalstream serve: configuration error: "


def _serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("EVALSTREAM_")}
    cmd = [EXE, "serve", "--data-dir", str(tmp_path / "data"), "--port", "0", "--metrics-address", "", *args]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**base, **(env or {})}, timeout=120, cwd=tmp_path
    )
    return done.returncode, done.stderr.splitlines()


def _assert_refused(tmp_path: Path, status: int, lines: list[str], *needles: str) -> None:
    assert status == 2, lines
    assert len(lines) == 1, "expected one line on stderr, got:\n" + "\n".join(lines)
    assert lines[0].startswith(PREFIX), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "data").exists(), "the store was opened before the configuration was checked"


def test_bad_setting_value(tmp_path: Path) -> None:
    status, lines = _serve(tmp_path, env={"EVALSTREAM_NUM_BINS": "many"})
    _assert_refused(tmp_path, status, lines, "num_bins", "expected an integer, got 'many'")


def test_unknown_key_in_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "evalstream.toml"
    config.write_text("num_bin = 3\n")
    status, lines = _serve(tmp_path, "--config", str(config))
    _assert_refused(tmp_path, status, lines, "unknown setting 'num_bin'", str(config))


def test_missing_config_file(tmp_path: Path) -> None:
    status, lines = _serve(tmp_path, "--config", str(tmp_path / "absent.yaml"))
    _assert_refused(tmp_path, status, lines, str(tmp_path / "absent.yaml"))


def test_missing_tls_file(tmp_path: Path) -> None:
    env = {"EVALSTREAM_TLS_CERT_FILE": str(tmp_path / "server.pem"), "EVALSTREAM_TLS_KEY_FILE": "/dev/null"}
    status, lines = _serve(tmp_path, env=env)
    _assert_refused(tmp_path, status, lines, "tls_cert_file", str(tmp_path / "server.pem"))


@pytest.mark.parametrize("backend", ["compiled", "eager"])
def test_short_token(tmp_path: Path, backend: str) -> None:
    """The compiled case is the one that used to start the engine warm-up before refusing."""
    env = {"EVALSTREAM_AUTH_TOKENS": "short", "EVALSTREAM_ENGINE_BACKEND": backend}
    status, lines = _serve(tmp_path, env=env)
    _assert_refused(tmp_path, status, lines, "EVALSTREAM_AUTH_TOKENS", "shorter than 16 characters")


def test_bad_warm_kernel(tmp_path: Path) -> None:
    status, lines = _serve(tmp_path, "--warm", "3000:float64")
    _assert_refused(tmp_path, status, lines, "warm_kernels entry '3000:float64'", "bfloat16")
