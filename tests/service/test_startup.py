"""Start-up of the compiled engine: the log says where inductor caches kernels, and ``warm_kernels``
(``evalstream serve --warm C:dtype``) compiles the named kernels before any stream asks for them."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch

from evalstream.service.engine import fused
from evalstream.service.engine.reducer import ChunkReducer
from evalstream.service.reduction import inductor_cache_dir
from evalstream.service.server import BackgroundServer
from tests.support.servers import small_settings

pytestmark = pytest.mark.skipif(not fused.compiler_available(), reason="no C++ compiler for inductor")


def _compiled(num_classes: int, dtype: torch.dtype) -> list[fused.KernelKey]:
    return [
        k
        for k, v in fused._kernels.items()
        if k.num_classes == num_classes and k.dtype == dtype and v is not None
    ]


def test_warm_kernels_compile_at_start_and_the_log_names_the_cache(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Class counts no other test uses, so the process-wide kernel table cannot already hold them.
    assert not _compiled(41, torch.float32) and not _compiled(43, torch.bfloat16)
    settings = small_settings(tmp_path, engine_backend="compiled", warm_kernels=("41:float32", "43:bfloat16"))
    caplog.set_level(logging.INFO)
    with BackgroundServer(settings) as srv:
        assert srv.server is not None and srv.server.warm_up is not None
        deadline = time.monotonic() + 600
        while not srv.server.warm_up.done() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert srv.server.warm_up.done() and srv.server.warm_up.exception() is None
        # No chunk was streamed: the start-up alone readied the pass. On the CPU with a C compiler that
        # is the native row pass (one library for every class count and dtype), so inductor compiled
        # nothing; where that cannot be built, these would be inductor's kernels.
        native = ChunkReducer(41, settings.engine_config()).native_library
        if native:
            assert not _compiled(41, torch.float32) and not _compiled(43, torch.bfloat16)
        else:
            assert _compiled(41, torch.float32) and _compiled(43, torch.bfloat16)
    text = caplog.text
    assert f"inductor's disk cache at {inductor_cache_dir()}" in text
    assert "compiling at start: 41:float32, 43:bfloat16" in text
    # The log names the pass that will reduce the chunks, not a compile that will never happen.
    how = "the native row pass" if native else "TorchInductor"
    assert f"kernel for 41 classes, float32 ready ({how})" in text
    assert f"kernel for 43 classes, bfloat16 ready ({how})" in text
    if native:
        assert "the native row pass is ready after" in text and native in text
        assert "compiled engine on the CPU: one native row pass" in text
        assert "the first chunk of each class count and score dtype compiles" not in text
