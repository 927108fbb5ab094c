"""Locating Debian's ``prometheus`` and ``promtool`` binaries for the tests."""

from __future__ import annotations

import shutil
import subprocess

import pytest


def binary(name: str) -> str:
    """Path of a Prometheus binary; the test is skipped (with the install hint) when absent."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (tools/ensure_prometheus.sh installs Debian's prometheus package)")
    return path


def promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run promtool and return the finished process (callers assert on returncode and output)."""
    return subprocess.run(
        [binary("promtool"), *args], input=stdin, capture_output=True, text=True, timeout=60, check=False
    )
