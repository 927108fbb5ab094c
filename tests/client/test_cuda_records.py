"""reduce="client" with CUDA tensors: the records come back to the host through pinned buffers and an
event the sender thread waits on, so ``add()`` never synchronizes the device.

The CUDA tests skip (visibly, with the reason) on a machine without a device; ``bench/gpu.sh``
runs them where one is lent. What runs everywhere: the engine's host-copy hook, which the CUDA path
uses, gives the same records as the default copy.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from evalstream import wire
from evalstream.client import EvalClient
from evalstream.client.reduce import ClientEngine, RecordsBatch, device_batch
from evalstream.service.engine import EngineConfig, Records
from evalstream.service.engine.records import FIELDS
from evalstream.service.engine.reducer import ChunkReducer
from evalstream.service.records_wire import decode_records, layout_for
from tests.client.conftest import NUM_CLASSES, make_batches

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device on this machine: the pinned-buffer records path (copies behind the "
    "reduction, an event the sender waits on, add() never synchronizing) runs in bench/gpu.sh",
)
# The CUDA engine against the CPU one: float32 arithmetic in another order (reductions over the
# classes in parallel), so floats agree to float32 rounding, not bit for bit.
CUDA_RTOL, CUDA_ATOL = 1e-5, 1e-5
CONFIG = EngineConfig(device="cpu", backend="eager")
LAYOUT = layout_for(CONFIG.inverse_temperatures, CONFIG.max_rank)


def _engine() -> ClientEngine:
    reply = LAYOUT.to_pb(4 << 20)
    return ClientEngine.from_reply(reply, NUM_CLASSES, "logits", "eager", 1 << 20, 4 << 20)


def _records_of(batch: RecordsBatch) -> Records:
    """The records a reduced batch's messages carry, as the server decodes them."""
    parts = []
    for data in batch.chunks:
        msg = wire.parse_stream_request(data)
        assert isinstance(msg, wire.RawRecords)
        parts.append(decode_records(msg, LAYOUT, NUM_CLASSES, 1 << 20))
    return Records.concat(parts)


def test_the_host_copy_hook_gives_the_records_of_the_default_copy() -> None:
    """The CUDA path brings the engine's outputs back through ``to_host``; on the CPU the same hook
    (copies into separate buffers) must change nothing, the checks included."""
    reducer = ChunkReducer(NUM_CLASSES, CONFIG)
    scores, labels, ids = make_batches(1, 300)[0]
    seen: list[int] = []

    def copy(*outputs: torch.Tensor) -> Any:
        seen.append(len(outputs))
        return tuple(t.clone() for t in outputs)

    plain = reducer.reduce(scores, labels, ids)
    hooked = reducer.reduce(scores, labels, ids, to_host=copy)
    assert seen == [3]
    for name in FIELDS:
        assert getattr(hooked, name).tobytes() == getattr(plain, name).tobytes(), name
    scores[7, 3] = np.nan  # the checks run on what the hook returned: still refused, same row
    with pytest.raises(Exception, match=r"scores\[7, 3\]"):
        reducer.reduce(scores, labels, ids, to_host=copy)


@needs_cuda
def test_cuda_records_equal_the_cpu_engines_within_float32_rounding() -> None:
    engine = _engine()
    for scores, labels, ids in make_batches(3, 500, seed=5):
        cpu = ChunkReducer(NUM_CLASSES, CONFIG).reduce(scores, labels, ids)
        dev = device_batch(torch.from_numpy(scores).cuda(), torch.from_numpy(labels).cuda(), ids, NUM_CLASSES)
        batch = RecordsBatch(dev, dev.rows, dev.nbytes)
        engine.reduce(batch, 0)
        got = _records_of(batch)
        for name in ("sample_id", "label", "pred", "rank", "ties"):
            assert np.array_equal(getattr(got, name), getattr(cpu, name)), name
        for name in ("nll", "confidence", "brier", "entropy", "nll_t"):
            np.testing.assert_allclose(getattr(got, name), getattr(cpu, name), rtol=CUDA_RTOL, atol=CUDA_ATOL)


@needs_cuda
def test_cuda_pinned_buffers_are_reused_not_reallocated() -> None:
    engine = _engine()
    for rows in (256, 512, 300, 512, 100, 512, 512):
        scores, labels, ids = make_batches(1, rows)[0]
        dev = device_batch(torch.from_numpy(scores).cuda(), torch.from_numpy(labels), ids, NUM_CLASSES)
        engine.reduce(RecordsBatch(dev, rows, dev.nbytes), 0)
    pool = engine.pinned
    assert pool.buffers == 3  # floats, ints, logsumexp
    assert pool.allocations == 6  # each pinned at 256 rows, then once more at 512: never again
    for buf in pool._buffers.values():
        assert buf.is_pinned() and buf.shape[0] == 512


@needs_cuda
def test_add_never_synchronizes_and_the_result_matches_the_server(client: EvalClient) -> None:
    batches = make_batches(6, 256, seed=9)
    on_device = [(torch.from_numpy(s).cuda(), torch.from_numpy(y).cuda(), ids) for s, y, ids in batches]
    torch.cuda.synchronize()
    with client.evaluation(run="cuda", model="pinned", num_classes=NUM_CLASSES, reduce="client") as ev:
        torch.cuda.set_sync_debug_mode("error")  # any synchronizing call on this thread raises
        try:
            for scores, labels, ids in on_device:
                ev.add(scores, labels, sample_ids=ids)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    by_client = ev.result(timeout=60)
    with client.evaluation(run="cuda", model="server", num_classes=NUM_CLASSES, reduce="server") as ref:
        for host_scores, host_labels, host_ids in batches:
            ref.add(host_scores, host_labels, sample_ids=host_ids)
    by_server = ref.result(timeout=60)
    assert by_client.result.num_samples == 6 * 256
    for name in ("nll", "accuracy_top1", "brier", "ece"):
        assert by_client.result.metrics[name] == pytest.approx(by_server.result.metrics[name], rel=1e-5)
