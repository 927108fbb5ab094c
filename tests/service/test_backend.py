"""The engine backend setting: validated, passed to the engine, and a compiled server equals an eager one."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from google.protobuf.json_format import MessageToDict

from evalstream.service.engine.fused import KernelKey, compiler_available, kernel_for
from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from evalstream.v1 import service_pb2, service_pb2_grpc
from tests.service.conftest import NUM_CLASSES, small_settings
from tests.service.helpers import Data, concat, expected_result, make_data, run_ranks


def test_engine_backend_defaults_to_auto_and_reaches_the_engine_config() -> None:
    assert Settings.load(env={}).engine_backend == "auto"
    s = Settings.load(env={"EVALSTREAM_ENGINE_BACKEND": "compiled"})
    assert s.engine_backend == "compiled" and s.engine_config().backend == "compiled"
    assert Settings.load(env={}, engine_backend="eager").engine_config().backend == "eager"
    with pytest.raises(ValueError, match="engine_backend must be one of eager, compiled, auto"):
        Settings.load(env={}, engine_backend="jit")


def _result(settings: Settings, parts: list[Data]) -> tuple[service_pb2.GetEvaluationResponse, str]:
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.target) as channel:
        assert srv.server is not None
        backend = srv.server.coordinator.engine_backend
        run_ranks(channel, parts, rows=45, num_classes=NUM_CLASSES)
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        ref = service_pb2.GetEvaluationRequest(
            ref={"run": "run-1", "model": "model-a", "step": 0}, include_per_class=True
        )
        return stub.GetEvaluation(ref, timeout=30), backend


@pytest.mark.skipif(not compiler_available(), reason="the compiled backend needs a C++ compiler on PATH")
def test_a_compiled_server_gives_the_eager_servers_result(tmp_path: Path) -> None:
    """Two real servers, one per backend, fed the same two ranks: the stored results are equal."""
    parts = [make_data(300, NUM_CLASSES, seed=40 + r, id_offset=1000 * r) for r in range(2)]
    eager, eager_backend = _result(small_settings(tmp_path / "eager", engine_backend="eager"), parts)
    compiled_settings = small_settings(tmp_path / "compiled", engine_backend="auto")
    compiled, compiled_backend = _result(compiled_settings, parts)
    assert (eager_backend, compiled_backend) == ("eager", "compiled")
    config = compiled_settings.engine_config()
    key = KernelKey(
        NUM_CLASSES,
        config.inverse_temperatures,
        config.max_rank,
        torch.float32,
        "cpu",
        torch.get_num_threads(),
    )
    assert kernel_for(key) is not None  # the kernel compiled (no silent fallback to eager)
    got, want = compiled.evaluation.result, eager.evaluation.result
    assert got.num_samples == 600
    # Exactly what the same compiled engine computes in this process on the same data...
    assert got == expected_result(concat(parts), NUM_CLASSES, config)
    # ...and the eager server's result: every count bit for bit, every float to float32 rounding.
    assert _differences(MessageToDict(got), MessageToDict(want)) == []
    assert np.isfinite(got.metrics["nll"])


def _differences(got: Any, want: Any, path: str = "result") -> list[str]:
    """Paths where two results differ: integers, strings and structure exactly, floats beyond 1e-5."""
    if isinstance(want, dict):
        if set(got) != set(want):
            return [f"{path}: fields {sorted(set(got) ^ set(want))}"]
        return [d for k in want for d in _differences(got[k], want[k], f"{path}.{k}")]
    if isinstance(want, list):
        if len(got) != len(want):
            return [f"{path}: {len(got)} items, not {len(want)}"]
        return [
            d
            for i, (g, w) in enumerate(zip(got, want, strict=True))
            for d in _differences(g, w, f"{path}[{i}]")
        ]
    if isinstance(want, float) or isinstance(got, float):
        return [] if math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-9) else [f"{path}: {got} != {want}"]
    return [] if got == want else [f"{path}: {got!r} != {want!r}"]
