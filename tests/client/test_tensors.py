"""Host copies and the raw-bytes wire form, without a server."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evalstream.client.tensors import MAX_CHUNK_ROWS, encode_chunk, rows_per_chunk, to_host_batch
from evalstream.v1 import tensor_pb2

C = 7


def _decode(t: tensor_pb2.Tensor, dtype: str) -> np.ndarray:
    return np.frombuffer(t.raw_contents, dtype=dtype).reshape(list(t.shape))


def test_float32_numpy_round_trips_through_the_chunk_bytes() -> None:
    scores = np.random.default_rng(0).standard_normal((10, C)).astype(np.float32)
    labels = np.arange(10) % C
    batch = to_host_batch(scores, labels, np.arange(100, 110), num_classes=C)
    batch.ready()
    chunk = encode_chunk(batch, 2, 7, sequence=3).chunk
    assert chunk.sequence == 3
    assert chunk.scores.dtype == tensor_pb2.DATA_TYPE_FLOAT32
    assert np.array_equal(_decode(chunk.scores, "<f4"), scores[2:7])
    assert chunk.labels.dtype == tensor_pb2.DATA_TYPE_INT64
    assert np.array_equal(_decode(chunk.labels, "<i8"), labels[2:7])
    assert np.array_equal(_decode(chunk.sample_ids, "<i8"), np.arange(102, 107))


def test_bfloat16_tensor_travels_as_its_16_bit_pattern() -> None:
    t = torch.randn(5, C).bfloat16()
    batch = to_host_batch(t, torch.zeros(5, dtype=torch.int32), num_classes=C)
    batch.ready()
    chunk = encode_chunk(batch, 0, 5, 0).chunk
    assert chunk.scores.dtype == tensor_pb2.DATA_TYPE_BFLOAT16
    assert chunk.scores.raw_contents == t.view(torch.int16).numpy().tobytes()
    back = torch.frombuffer(bytearray(chunk.scores.raw_contents), dtype=torch.bfloat16).reshape(5, C)
    assert torch.equal(back, t)
    assert chunk.labels.dtype == tensor_pb2.DATA_TYPE_INT32  # int32 labels are kept as they are
    assert not chunk.HasField("sample_ids")


def test_float16_numpy_keeps_its_dtype_and_float64_becomes_float32() -> None:
    half = to_host_batch(np.ones((2, C), np.float16), np.zeros(2, np.int64), num_classes=C)
    assert half.score_dtype == tensor_pb2.DATA_TYPE_FLOAT16 and half.scores.dtype == np.float16
    double = to_host_batch(np.ones((2, C), np.float64), np.zeros(2, np.uint8), num_classes=C)
    assert double.score_dtype == tensor_pb2.DATA_TYPE_FLOAT32 and double.scores.dtype == np.float32
    assert double.labels.dtype == np.int64


def test_big_endian_input_is_sent_little_endian() -> None:
    scores = np.arange(2 * C, dtype=">f4").reshape(2, C)
    batch = to_host_batch(scores, np.array([1, 2], dtype=">i8"), num_classes=C)
    batch.ready()
    chunk = encode_chunk(batch, 0, 2, 0).chunk
    assert np.array_equal(_decode(chunk.scores, "<f4"), scores.astype("<f4"))
    assert np.array_equal(_decode(chunk.labels, "<i8"), [1, 2])


def test_copy_flag_decides_whether_the_callers_buffer_is_shared() -> None:
    scores = np.zeros((3, C), np.float32)
    labels = np.zeros(3, np.int64)
    assert not np.shares_memory(to_host_batch(scores, labels, num_classes=C).scores, scores)
    assert np.shares_memory(to_host_batch(scores, labels, num_classes=C, copy=False).scores, scores)
    t = torch.zeros(3, C)
    copied = to_host_batch(t, torch.zeros(3, dtype=torch.long), num_classes=C)
    t.fill_(1.0)
    copied.ready()
    assert copied.scores.sum() == 0.0


def test_non_contiguous_tensor_is_sent_in_row_major_order() -> None:
    t = torch.arange(C * 4, dtype=torch.float32).reshape(C, 4).T  # [4, C], column-major view
    batch = to_host_batch(t, torch.zeros(4, dtype=torch.long), num_classes=C, copy=False)
    batch.ready()
    assert np.array_equal(_decode(encode_chunk(batch, 0, 4, 0).chunk.scores, "<f4"), t.numpy())


@pytest.mark.parametrize(
    ("scores", "labels", "ids", "error", "match"),
    [
        (
            np.zeros((3, C + 1), np.float32),
            np.zeros(3, np.int64),
            None,
            ValueError,
            rf"^argument scores must have shape \[n, {C}\]",
        ),
        (
            np.zeros((3, C), np.float32),
            np.zeros(4, np.int64),
            None,
            ValueError,
            r"^argument labels must have shape \[3\]",
        ),
        (
            np.zeros((3, C), np.float32),
            np.zeros(3, np.int64),
            np.zeros(2),
            ValueError,
            "^argument sample_ids must",
        ),
        (
            np.zeros((3, C), np.int32),
            np.zeros(3, np.int64),
            None,
            TypeError,
            "^argument scores must be floating point",
        ),
        (
            np.zeros((3, C), np.float32),
            np.zeros(3, np.float32),
            None,
            TypeError,
            "^argument labels must be an integer",
        ),
        (
            torch.zeros(3, C),
            torch.zeros(3, dtype=torch.bool),
            None,
            TypeError,
            "^argument labels must be an integer",
        ),
    ],
)
def test_wrong_shapes_and_dtypes_are_refused(
    scores: object, labels: object, ids: object, error: type[Exception], match: str
) -> None:
    """The message leads with the argument it is about (not a bare or missing name)."""
    with pytest.raises(error, match=match):
        to_host_batch(scores, labels, ids, num_classes=C)


def test_rows_per_chunk_targets_chunk_bytes_and_respects_the_message_limit() -> None:
    row = 3000 * 4 + 16
    assert rows_per_chunk(3000, 4, 1 << 20, 4 << 20) == (1 << 20) // row
    assert rows_per_chunk(3000, 4, 1 << 30, 4 << 20) == ((4 << 20) - 4096) // row
    assert rows_per_chunk(3000, 2, 1 << 20, 4 << 20) == (1 << 20) // (3000 * 2 + 16)
    assert rows_per_chunk(2, 4, 1 << 30, 1 << 30) == MAX_CHUNK_ROWS
    assert rows_per_chunk(3000, 4, 1, 4 << 20) == 1
    with pytest.raises(ValueError, match="exceeds"):
        rows_per_chunk(1_000_000, 4, 1 << 20, 1 << 20)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensor_is_copied_asynchronously_into_pinned_memory() -> None:
    scores = torch.randn(64, C, device="cuda")
    labels = torch.randint(0, C, (64,), device="cuda")
    batch = to_host_batch(scores, labels, torch.arange(64, device="cuda"), num_classes=C)
    assert batch.event is not None and batch.scores.is_pinned()
    batch.ready()
    assert np.array_equal(batch.scores, scores.cpu().numpy())
    assert np.array_equal(batch.labels, labels.cpu().numpy())
    batch.release()
