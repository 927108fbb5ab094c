"""The hand-built chunk bytes equal protobuf's serialization, and pooled host copies are real copies."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evalstream.client.tensors import HostPool, encode_chunk, encode_chunk_bytes, to_host_batch
from evalstream.v1 import service_pb2

C = 7


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("rows", "sequence", "with_ids"), [(5, 0, True), (0, 3, False), (300, 2**40, True)])
def test_chunk_bytes_equal_protobuf_serialization(
    dtype: torch.dtype, rows: int, sequence: int, with_ids: bool
) -> None:
    scores = torch.randn(rows, C).to(dtype)
    labels = torch.arange(rows, dtype=torch.int32) % C
    ids = torch.arange(rows) + 2**40 if with_ids else None
    batch = to_host_batch(scores, labels, ids, num_classes=C)
    batch.ready()
    fast = encode_chunk_bytes(batch, 0, rows, sequence)
    assert fast == encode_chunk(batch, 0, rows, sequence).SerializeToString()
    parsed = service_pb2.StreamEvaluationRequest.FromString(fast)
    assert parsed.chunk.sequence == sequence and list(parsed.chunk.scores.shape) == [rows, C]


def test_chunk_bytes_of_a_slice_of_a_numpy_batch() -> None:
    scores = np.random.default_rng(1).standard_normal((40, C)).astype(np.float32)
    batch = to_host_batch(scores, np.arange(40) % C, num_classes=C)
    batch.ready()
    request = service_pb2.StreamEvaluationRequest.FromString(encode_chunk_bytes(batch, 10, 25, 1))
    got = np.frombuffer(request.chunk.scores.raw_contents, "<f4").reshape(15, C)
    np.testing.assert_array_equal(got, scores[10:25])
    assert not request.chunk.HasField("sample_ids")


@pytest.mark.parametrize("make", [lambda: torch.randn(6, C), lambda: np.ones((6, C), np.float16)])
def test_pooled_host_copies_are_copies_and_buffers_come_back(make: object) -> None:
    pool = HostPool()
    x = make()  # type: ignore[operator]
    batch = to_host_batch(x, np.zeros(6, np.int64), num_classes=C, host_pool=pool)
    batch.ready()
    original = np.asarray(x).copy()
    np.testing.assert_array_equal(batch.scores, original)
    x[0, 0] = 123  # the caller may change its tensor right after add()
    np.testing.assert_array_equal(batch.scores, original)
    buffer = batch.scores
    batch.release()
    again = to_host_batch(make(), np.zeros(6, np.int64), num_classes=C, host_pool=pool)  # type: ignore[operator]
    again.ready()
    assert np.shares_memory(again.scores, buffer)  # the buffer was reused
