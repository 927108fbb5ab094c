"""Tensor decoding: views over the message bytes (no copy), and every malformed tensor named."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evalstream.service.decode import decode_chunk
from evalstream.service.engine import ChunkError
from evalstream.v1 import service_pb2, tensor_pb2
from evalstream.wire import encode_tensor


def _chunk(scores: object, labels: np.ndarray, ids: np.ndarray | None = None) -> service_pb2.Chunk:
    chunk = service_pb2.Chunk(scores=encode_tensor(scores), labels=encode_tensor(labels))  # type: ignore[arg-type]
    if ids is not None:
        chunk.sample_ids.CopyFrom(encode_tensor(ids))
    return chunk


def test_decode_views_the_bytes_without_copying() -> None:
    scores = np.arange(12, dtype=np.float32).reshape(3, 4)
    chunk = _chunk(scores, np.array([0, 1, 3], np.int32), np.array([7, 8, 9], np.int64))
    raw = chunk.scores.raw_contents
    decoded = decode_chunk(chunk, 4, 100)
    assert isinstance(decoded.scores, np.ndarray)
    assert not decoded.scores.flags.owndata and not decoded.scores.flags.writeable
    np.testing.assert_array_equal(decoded.scores, scores)
    np.testing.assert_array_equal(decoded.labels, [0, 1, 3])
    np.testing.assert_array_equal(decoded.sample_ids, [7, 8, 9])  # type: ignore[arg-type]
    assert decoded.num_bytes == len(raw) == 48
    view = np.frombuffer(raw, dtype="<f4")
    assert view.base is raw  # the mechanism decode_chunk relies on


def test_bfloat16_and_float16_round_trip() -> None:
    scores = torch.randn(5, 3)
    bf = decode_chunk(_chunk(scores.to(torch.bfloat16), np.zeros(5, np.int64)), 3, 100)
    assert isinstance(bf.scores, torch.Tensor) and bf.scores.dtype == torch.bfloat16
    assert torch.equal(bf.scores, scores.to(torch.bfloat16))
    half = decode_chunk(_chunk(scores.numpy().astype(np.float16), np.zeros(5, np.int64)), 3, 100)
    assert half.scores.dtype == np.float16


def test_malformed_tensors_have_stable_reasons() -> None:
    good = _chunk(np.zeros((2, 3), np.float32), np.zeros(2, np.int64))
    cases: list[tuple[str, service_pb2.Chunk]] = []
    c = service_pb2.Chunk()
    c.CopyFrom(good)
    c.scores.shape[:] = [2, 1 << 62]
    cases.append(("byte_length_mismatch", c))
    c = service_pb2.Chunk()
    c.CopyFrom(good)
    c.scores.shape[:] = [6]
    cases.append(("bad_shape", c))
    c = service_pb2.Chunk()
    c.CopyFrom(good)
    c.labels.dtype = tensor_pb2.DATA_TYPE_FLOAT32
    cases.append(("bad_dtype", c))
    c = service_pb2.Chunk()
    c.CopyFrom(good)
    c.sample_ids.CopyFrom(encode_tensor(np.zeros(3, np.int64)))
    cases.append(("label_count_mismatch", c))
    for reason, chunk in cases:
        with pytest.raises(ChunkError) as info:
            decode_chunk(chunk, 3, 100)
        assert info.value.reason == reason
    with pytest.raises(ChunkError) as info:
        decode_chunk(good, 3, 1)
    assert info.value.reason == "chunk_too_large"
