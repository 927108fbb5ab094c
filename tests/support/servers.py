"""Settings for a small real server on loopback, shared by the client and service tests.

One definition, so every folder's server starts the same way: port 0 (the OS picks a free
port, so tests run side by side), no metrics listener, the CPU, and the engine backend the
suite chose in tests/conftest.py. ``Settings.load(env={})`` ignores the environment, so that
choice is passed on here explicitly.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evalstream.service.settings import Settings

ENGINE_BACKEND_VARIABLE = "EVALSTREAM_ENGINE_BACKEND"


def small_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings for a test server keeping its SQLite store under ``data_dir``; ``overrides`` win."""
    values: dict[str, Any] = {
        "data_dir": str(data_dir),
        "grpc_address": "127.0.0.1:0",
        "metrics_address": "",
        "device": "cpu",
        "worker_threads": 2,
        "shutdown_grace_s": 1.0,
        # Eager unless the environment (or a test) says otherwise: the compiled kernel costs seconds
        # to build in each server process.
        "engine_backend": os.environ.get(ENGINE_BACKEND_VARIABLE, "eager"),
    }
    values.update(overrides)
    return Settings.load(env={}, **values)
