"""A received chunk checked and viewed for the engine, without copying its rows.

The bytes were read off the wire by ``evalstream.wire`` (or, for the rare request in an unusual
form, by protobuf); here each tensor's dtype, shape and byte length are checked against the shard
and the payloads viewed in place (``numpy.frombuffer``), so the only copy of a chunk's rows on the
server is the one into its staging block.

Every malformed tensor becomes a ``ChunkError`` with a stable reason
(``dtype_unspecified``, ``bad_dtype``, ``bad_shape``, ``shape_mismatch``,
``byte_length_mismatch``, ``chunk_too_large``, ``label_count_mismatch``), which
the servicer returns in-band so the stream survives.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch

from evalstream.service.engine.errors import ChunkError
from evalstream.v1 import service_pb2
from evalstream.wire import (
    DT,
    HOST_DTYPES,
    INDEX_DTYPES,
    ITEMSIZE,
    SCORE_DTYPES,
    RawChunk,
    RawTensor,
    raw_chunk,
)

# torch.frombuffer / torch.from_numpy warn that the message bytes are not writable; nothing writes them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

TORCH_SCORE_DTYPES: dict[int, torch.dtype] = {
    DT.DATA_TYPE_FLOAT32: torch.float32,
    DT.DATA_TYPE_FLOAT16: torch.float16,
    DT.DATA_TYPE_BFLOAT16: torch.bfloat16,
}

Scores = npt.NDArray[np.floating] | torch.Tensor


@dataclass
class DecodedChunk:
    """A chunk's tensors as zero-copy views over the received bytes.

    ``host`` is the scores as a numpy array over the same bytes (bfloat16 as int16 bit patterns),
    which the staging copy uses: numpy copies unaligned views and costs far less per call than torch.
    """

    host: npt.NDArray[np.generic]
    labels: npt.NDArray[np.integer]
    sample_ids: npt.NDArray[np.int64] | None
    num_bytes: int
    dtype: torch.dtype

    @property
    def rows(self) -> int:
        return int(self.host.shape[0])

    @property
    def scores(self) -> Scores:
        """The scores for the engine: the numpy view, or a torch bfloat16 view over the same bytes."""
        if self.dtype != torch.bfloat16:
            return self.host  # type: ignore[return-value]
        if self.host.size == 0:
            return torch.empty(self.host.shape, dtype=torch.bfloat16)
        return torch.from_numpy(self.host).view(torch.bfloat16)


def _dtype_name(code: int) -> str:
    try:
        return DT.Name(code)
    except ValueError:
        return str(code)


def _names(codes: tuple[int, ...]) -> str:
    return ", ".join(_dtype_name(c) for c in codes)


def _check(t: RawTensor, what: str, allowed: tuple[int, ...], ndim: int) -> tuple[int, ...]:
    """Validate dtype, shape and byte length; return the shape."""
    if t.dtype == DT.DATA_TYPE_UNSPECIFIED:
        raise ChunkError("dtype_unspecified", f"{what}: dtype is unset; set it to one of {_names(allowed)}")
    if t.dtype not in allowed:
        raise ChunkError(
            "bad_dtype", f"{what}: dtype {_dtype_name(t.dtype)} is not allowed; use {_names(allowed)}"
        )
    shape = t.shape
    if len(shape) != ndim or any(d < 0 for d in shape):
        raise ChunkError("bad_shape", f"{what}: shape {list(shape)} must have {ndim} non-negative dimensions")
    expected = math.prod(shape) * ITEMSIZE[t.dtype]
    if len(t.raw) != expected:
        raise ChunkError(
            "byte_length_mismatch",
            f"{what}: {len(t.raw)} bytes but shape {list(shape)} of {_dtype_name(t.dtype)} "
            f"needs {expected}; send raw little-endian row-major bytes",
        )
    return shape


def _view(t: RawTensor, shape: tuple[int, ...]) -> npt.NDArray[np.generic]:
    return np.frombuffer(t.raw, dtype=HOST_DTYPES[t.dtype]).reshape(shape)


def decode_raw(chunk: RawChunk, num_classes: int, max_rows: int) -> DecodedChunk:
    """The chunk's scores [n, C], labels [n] and optional sample ids [n], as views over its bytes."""
    scores_t = chunk.scores
    if scores_t.dtype in SCORE_DTYPES and len(scores_t.shape) >= 1 and scores_t.shape[0] > max_rows:
        raise ChunkError(
            "chunk_too_large",
            f"scores: {scores_t.shape[0]} rows exceed the server's max_chunk_rows={max_rows}; "
            "send smaller chunks",
        )
    shape = _check(scores_t, "scores", SCORE_DTYPES, 2)
    n, c = shape
    if c != num_classes:
        raise ChunkError(
            "shape_mismatch",
            f"scores: shape {list(shape)} has {c} classes but the shard opened with {num_classes}",
        )
    host = _view(scores_t, shape)
    label_shape = _check(chunk.labels, "labels", INDEX_DTYPES, 1)
    if label_shape[0] != n:
        raise ChunkError("label_count_mismatch", f"labels: {label_shape[0]} labels for {n} rows of scores")
    labels = _view(chunk.labels, label_shape)
    sample_ids = None
    if chunk.sample_ids is not None:
        id_shape = _check(chunk.sample_ids, "sample_ids", INDEX_DTYPES, 1)
        if id_shape[0] != n:
            raise ChunkError("label_count_mismatch", f"sample_ids: {id_shape[0]} ids for {n} rows of scores")
        ids = _view(chunk.sample_ids, id_shape)
        sample_ids = ids if ids.dtype == np.int64 else ids.astype(np.int64)
    return DecodedChunk(
        host,
        labels,  # type: ignore[arg-type]
        sample_ids,  # type: ignore[arg-type]
        len(scores_t.raw),
        TORCH_SCORE_DTYPES[scores_t.dtype],
    )


def decode_chunk(chunk: service_pb2.Chunk, num_classes: int, max_rows: int) -> DecodedChunk:
    """``decode_raw`` of a protobuf Chunk (requests the wire parser left to protobuf)."""
    return decode_raw(raw_chunk(chunk), num_classes, max_rows)
