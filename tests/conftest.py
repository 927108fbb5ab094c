"""Shared test configuration: the machine is small and shared, so torch runs on one thread."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread() -> None:
    torch.set_num_threads(1)
