"""Engine tests run single-threaded: the machine is shared and small tensors gain nothing from threads."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> None:
    torch.set_num_threads(1)
