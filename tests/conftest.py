"""Shared test configuration: the machine is small and shared, so torch runs on one thread.

Servers in tests run the eager engine backend unless a test asks for another: the compiled
backend compiles its kernel on the first chunk of every server process (seconds each), which
the many short-lived servers of the suite would pay again and again. Set at import, so servers
in this process and in subprocesses inherit it (fixtures that build settings with
``Settings.load(env={})`` pass it on themselves). Tests of the compiled backend name it explicitly.
"""

from __future__ import annotations

import os

import pytest
import torch

ENGINE_BACKEND_VARIABLE = "EVALSTREAM_ENGINE_BACKEND"
os.environ.setdefault(ENGINE_BACKEND_VARIABLE, "eager")


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread() -> None:
    torch.set_num_threads(1)
