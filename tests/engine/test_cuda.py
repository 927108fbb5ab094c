"""The CUDA path (skipped, visibly, without a GPU): same records as the CPU path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evalstream.service.engine import EngineConfig
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer
from tests.engine.data import make_data

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("on_device", [False, True])
def test_cuda_matches_cpu(dtype: torch.dtype, on_device: bool) -> None:
    data = make_data(3000, 2500, 101, scale=1.0)
    scores = torch.from_numpy(data.logits).to(dtype)
    cpu_cfg = EngineConfig(device="cpu", block_rows=1024)
    gpu_cfg = EngineConfig(device="cuda:0", block_rows=1024)
    cpu = ChunkReducer(3000, cpu_cfg).reduce(scores, data.labels, data.sample_ids)
    gpu_in = scores.cuda() if on_device else scores
    gpu = ChunkReducer(3000, gpu_cfg).reduce(gpu_in, data.labels, data.sample_ids)
    np.testing.assert_array_equal(gpu.sample_id, cpu.sample_id)
    np.testing.assert_array_equal(gpu.label, cpu.label)
    np.testing.assert_array_equal(gpu.rank, cpu.rank)
    np.testing.assert_array_equal(gpu.pred, cpu.pred)
    for name in ("nll", "confidence", "brier", "entropy", "nll_t"):
        np.testing.assert_allclose(getattr(gpu, name), getattr(cpu, name), rtol=1e-5, atol=1e-5, err_msg=name)
    a = compute_metrics(gpu, 3000, cpu_cfg).scalars()
    b = compute_metrics(cpu, 3000, cpu_cfg).scalars()
    for k in b:
        assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), k


def test_cuda_rejects_non_finite() -> None:
    from evalstream.service.engine import ChunkError

    z = torch.randn(100, 10, device="cuda")
    z[42, 3] = float("nan")
    with pytest.raises(ChunkError, match=r"scores\[42, 3\]"):
        ChunkReducer(10, EngineConfig(device="cuda:0")).reduce(z, torch.zeros(100, dtype=torch.int64))
