"""Chunks coalesced into staging blocks: pipelined streams over the real server, and the pool's bound."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from evalstream.service.staging import MAX_BLOCKS, StagingBlock, StagingPool, capacity_rows
from evalstream.service.wire import decode_chunk
from evalstream.v1 import service_pb2, service_pb2_grpc

from .conftest import NUM_CLASSES, small_settings
from .helpers import Data, chunk_request, close_request, concat, expected_result, make_data, open_request


def _pipelined(channel: grpc.Channel, requests: list[service_pb2.StreamEvaluationRequest]) -> list:
    """Send every request without waiting for answers (as the client does); return all answers."""
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    return list(stub.StreamEvaluation(iter(requests)))


def test_pipelined_chunks_share_blocks_and_only_bad_chunks_are_rejected(
    server: BackgroundServer, channel: grpc.Channel, settings: Settings
) -> None:
    parts = [make_data(37, NUM_CLASSES, seed=s, id_offset=100 * s) for s in range(12)]
    bad = {3: "non_finite", 7: "label_out_of_range"}
    requests = [open_request()]
    for seq, part in enumerate(parts):
        if seq == 3:
            part = Data(part.scores.copy(), part.labels, part.ids)
            part.scores[5, 2] = np.nan
        elif seq == 7:
            part = Data(part.scores, part.labels.copy(), part.ids)
            part.labels[4] = NUM_CLASSES
        requests.append(chunk_request(seq, part))
    requests.append(close_request(len(parts)))
    answers = _pipelined(channel, requests)
    assert server.server is not None
    registry = server.server.telemetry.registry
    reductions = registry.get_sample_value("evalstream_chunk_compute_seconds_count")
    assert reductions is not None and reductions < len(parts)  # chunks were reduced together
    acks = [a.ack for a in answers[1:-1]]
    assert [a.next_sequence for a in acks] == list(range(1, len(parts) + 1))  # in order, one per chunk
    rejected = {a.rejection.sequence: a.rejection.reason for a in acks if a.HasField("rejection")}
    assert rejected == bad
    # Positions are relative to the refused chunk, not to the block it was staged in.
    messages = {a.rejection.sequence: a.rejection.message for a in acks if a.HasField("rejection")}
    assert "scores[5, 2]" in messages[3] and "labels[4]" in messages[7]
    good = [p for i, p in enumerate(parts) if i not in bad]
    closed = answers[-1].closed
    assert closed.finalized and closed.samples == sum(len(p) for p in good) and closed.rejected_chunks == 2
    stub = service_pb2_grpc.EvalStreamServiceStub(channel)
    ref = service_pb2.GetEvaluationRequest(
        ref={"run": "run-1", "model": "model-a", "step": 0}, include_per_class=True
    )
    evaluation = stub.GetEvaluation(ref).evaluation
    assert evaluation.result == expected_result(concat(good), NUM_CLASSES, settings.engine_config())


def test_chunks_with_and_without_ids_and_of_two_dtypes_do_not_mix(
    channel: grpc.Channel, settings: Settings
) -> None:
    data = make_data(120, NUM_CLASSES, seed=9)
    requests = [open_request()]
    cuts = [(0, 30, True), (30, 60, False), (60, 90, True), (90, 120, True)]
    for seq, (a, b, with_ids) in enumerate(cuts):
        part = data.part(a, b)
        if seq == 3:
            part = Data(part.scores.astype(np.float16), part.labels, part.ids)
        requests.append(chunk_request(seq, part, with_ids=with_ids))
    requests.append(close_request(len(cuts)))
    answers = _pipelined(channel, requests)
    assert [a.ack.next_sequence for a in answers[1:-1]] == [1, 2, 3, 4]
    assert not any(a.ack.HasField("rejection") for a in answers[1:-1])
    assert answers[-1].closed.samples == 120


def test_block_copies_rows_and_keeps_chunk_boundaries() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        block = StagingBlock(capacity=100, num_classes=NUM_CLASSES, dtype=torch.float32)
        a, b = make_data(40, NUM_CLASSES, seed=1), make_data(50, NUM_CLASSES, seed=2)
        for seq, part in enumerate((a, b)):
            decoded = decode_chunk(chunk_request(seq, part).chunk, NUM_CLASSES, 1000)
            assert block.accepts(decoded, torch.float32)
            block.append(decoded, seq, loop.create_future())
        scores, labels, ids = block.views()
        np.testing.assert_array_equal(scores.numpy(), np.concatenate([a.scores, b.scores]))
        np.testing.assert_array_equal(labels.numpy(), np.concatenate([a.labels, b.labels]))
        assert ids is not None
        np.testing.assert_array_equal(ids.numpy(), np.concatenate([a.ids, b.ids]))
        assert [(s.sequence, s.start, s.stop) for s in block.segments] == [(0, 0, 40), (1, 40, 90)]
        third = decode_chunk(chunk_request(2, make_data(11, NUM_CLASSES)).chunk, NUM_CLASSES, 1000)
        assert not block.accepts(third, torch.float32)  # 90 + 11 > 100
        for s in block.segments:
            s.outcome.cancel()

    asyncio.run(main())


def test_pool_holds_at_most_two_blocks_per_stream() -> None:
    async def main() -> None:
        pool = StagingPool(NUM_CLASSES, block_rows=64)
        held = [await pool.acquire(torch.float32) for _ in range(MAX_BLOCKS)]
        waiting = asyncio.ensure_future(pool.acquire(torch.float32))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # backpressure: the stream waits for a block
        pool.release(held[0])
        again = await asyncio.wait_for(waiting, 1.0)
        assert again is held[0]  # reused, not reallocated

    asyncio.run(main())


@pytest.mark.parametrize(
    ("classes", "itemsize", "rows"), [(3000, 4, 1024), (3000, 2, 1024), (100_000, 4, 41)]
)
def test_block_size_is_bounded_in_bytes(classes: int, itemsize: int, rows: int) -> None:
    assert capacity_rows(1024, classes, itemsize) == rows


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_staged_blocks_on_cuda_match_the_cpu_engine(tmp_path: Path, dtype: type) -> None:
    """The server path on a GPU: staged host blocks go through the engine's pinned copies."""
    settings = small_settings(tmp_path / "data", device="cuda")
    parts = [make_data(90, NUM_CLASSES, seed=s, id_offset=100 * s) for s in range(8)]
    requests = [open_request()]
    for seq, part in enumerate(parts):
        requests.append(chunk_request(seq, Data(part.scores.astype(dtype), part.labels, part.ids)))
    requests.append(close_request(len(parts)))
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.target) as channel:
        answers = _pipelined(channel, requests)
        assert answers[-1].closed.finalized and answers[-1].closed.samples == 720
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        got = stub.GetEvaluation(
            service_pb2.GetEvaluationRequest(ref={"run": "run-1", "model": "model-a", "step": 0})
        ).evaluation.result
    data = concat(parts)
    cpu_settings = small_settings(tmp_path / "cpu")
    expected = expected_result(
        Data(data.scores.astype(dtype), data.labels, data.ids), NUM_CLASSES, cpu_settings.engine_config()
    )
    assert got.num_samples == expected.num_samples
    for name, value in expected.metrics.items():
        assert got.metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name
