"""Chunks coalesced into staging blocks: pipelined streams over the real server, and the pool's bound."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from evalstream.service.decode import decode_chunk
from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from evalstream.service.staging import (
    MAX_BLOCKS,
    StagingBlock,
    StagingBudget,
    StagingPool,
    block_bytes,
    capacity_rows,
)
from evalstream.v1 import service_pb2, service_pb2_grpc
from tests.service.conftest import NUM_CLASSES, small_settings
from tests.service.helpers import (
    Data,
    chunk_request,
    close_request,
    concat,
    expected_result,
    make_data,
    open_request,
)


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


def test_streams_share_one_budget_and_take_back_idle_blocks() -> None:
    """Two streams, room for two blocks: the second waits, then reclaims the first one's idle block."""

    async def main() -> None:
        one = block_bytes(64, NUM_CLASSES, torch.float32)
        budget = StagingBudget(2 * one)
        a = StagingPool(NUM_CLASSES, 64, budget)
        b = StagingPool(NUM_CLASSES, 64, budget)
        held = [await a.acquire(torch.float32) for _ in range(MAX_BLOCKS)]
        assert budget.used == 2 * one
        waiting = asyncio.ensure_future(b.acquire(torch.float32))
        await asyncio.sleep(0.01)
        assert not waiting.done() and budget.waiting == 1  # stream b stops reading
        a.release(held[0])  # idle in a's pool: reclaimable
        got = await asyncio.wait_for(waiting, 1.0)
        assert got is not held[0] and budget.used == 2 * one and budget.peak == 2 * one
        again = asyncio.ensure_future(a.acquire(torch.float32))  # a's idle block went to b
        await asyncio.sleep(0.01)
        assert not again.done()
        b.close()
        b.release(got)  # b's stream ended: its block goes back to the budget, and a gets room
        assert (await asyncio.wait_for(again, 1.0)).capacity == 64
        a.release(held[1])
        a.close()
        assert budget.used == one  # only the block a still has in use

    asyncio.run(main())


def test_a_cancelled_waiter_gives_its_place_up_and_a_huge_block_streams_alone() -> None:
    async def main() -> None:
        one = block_bytes(64, NUM_CLASSES, torch.float32)
        budget = StagingBudget(one // 2)  # smaller than one block
        a = StagingPool(NUM_CLASSES, 64, budget)
        b = StagingPool(NUM_CLASSES, 64, budget)
        first = await a.acquire(torch.float32)  # granted: nothing else is held
        cancelled = asyncio.ensure_future(b.acquire(torch.float32))
        behind = asyncio.ensure_future(b.acquire(torch.float32))
        await asyncio.sleep(0.01)
        cancelled.cancel()
        await asyncio.sleep(0.01)
        assert not behind.done() and budget.waiting == 1
        a.close()
        a.release(first)
        assert (await asyncio.wait_for(behind, 1.0)).capacity == 64
        assert budget.used == one

    asyncio.run(main())


def test_many_streams_through_a_small_staging_budget_give_the_exact_result(tmp_path: Path) -> None:
    """Eight pipelined ranks, room for three blocks in all: streams wait for blocks, none deadlocks,
    every chunk commits once, and every block is back in the budget when the streams end."""
    block_rows = 64
    budget = 3 * block_bytes(block_rows, NUM_CLASSES, torch.float32)
    settings = small_settings(tmp_path / "data", block_rows=block_rows, max_staging_bytes=budget)
    ranks = 8
    parts = [
        [make_data(23, NUM_CLASSES, seed=10 * r + i, id_offset=1000 * r + 23 * i) for i in range(9)]
        for r in range(ranks)
    ]
    with BackgroundServer(settings) as srv, grpc.insecure_channel(srv.target) as channel:
        assert srv.server is not None
        staging = srv.server.coordinator.staging_budget
        streams = [
            [
                open_request(rank=r, world_size=ranks),
                *(chunk_request(i, p) for i, p in enumerate(parts[r])),
                close_request(len(parts[r])),
            ]
            for r in range(ranks)
        ]
        with ThreadPoolExecutor(ranks) as pool:
            answers = list(pool.map(lambda requests: _pipelined(channel, requests), streams))
        for rank_answers in answers:
            acks = [a.ack for a in rank_answers[1:-1]]
            assert [a.next_sequence for a in acks] == list(range(1, 10))
            assert not any(a.HasField("rejection") for a in acks)
        assert sum(a[-1].closed.finalized for a in answers) == 1
        stub = service_pb2_grpc.EvalStreamServiceStub(channel)
        ref = service_pb2.GetEvaluationRequest(
            ref={"run": "run-1", "model": "model-a", "step": 0}, include_per_class=True
        )
        result = stub.GetEvaluation(ref, timeout=30).evaluation.result
        assert staging.peak <= budget and staging.used == 0
        assert staging.waits > 0  # the budget, not the streams' own two-block limit, held them back
    everything = concat([p for rank in parts for p in rank])
    assert result == expected_result(everything, NUM_CLASSES, settings.engine_config())
