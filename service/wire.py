"""Proto ``Tensor`` <-> numpy/torch without copies.

Decoding views the message's ``raw_contents`` bytes in place
(``numpy.frombuffer``; ``torch.frombuffer`` for bfloat16, which numpy lacks),
so a 1 MiB chunk costs no extra memory traffic before the engine reads it.
The views are read-only and live as long as the request message.
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

from evalstream.v1 import service_pb2, tensor_pb2

from .engine.errors import ChunkError

# torch.frombuffer / torch.from_numpy warn that the message bytes are not writable; nothing writes them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)

DT = tensor_pb2.DataType
NUMPY_DTYPES: dict[int, np.dtype] = {
    DT.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    DT.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    DT.DATA_TYPE_INT32: np.dtype("<i4"),
    DT.DATA_TYPE_INT64: np.dtype("<i8"),
}
ITEMSIZE: dict[int, int] = {**{k: v.itemsize for k, v in NUMPY_DTYPES.items()}, DT.DATA_TYPE_BFLOAT16: 2}
SCORE_DTYPES = (DT.DATA_TYPE_FLOAT32, DT.DATA_TYPE_FLOAT16, DT.DATA_TYPE_BFLOAT16)
INDEX_DTYPES = (DT.DATA_TYPE_INT32, DT.DATA_TYPE_INT64)

Scores = npt.NDArray[np.floating] | torch.Tensor


@dataclass
class DecodedChunk:
    """A chunk's tensors as zero-copy views over the request's bytes."""

    scores: Scores
    labels: npt.NDArray[np.integer]
    sample_ids: npt.NDArray[np.int64] | None
    num_bytes: int

    @property
    def rows(self) -> int:
        return int(self.scores.shape[0])


def _dtype_name(code: int) -> str:
    try:
        return DT.Name(code)
    except ValueError:
        return str(code)


def _check(
    t: tensor_pb2.Tensor, what: str, allowed: tuple[int, ...], ndim: int
) -> tuple[tuple[int, ...], bytes]:
    """Validate dtype, shape and byte length; return the shape and the raw bytes.

    ``raw_contents`` is read once: protobuf copies a bytes field on every read.
    """
    if t.dtype == DT.DATA_TYPE_UNSPECIFIED:
        raise ChunkError("dtype_unspecified", f"{what}: dtype is unset; set it to one of {_names(allowed)}")
    if t.dtype not in allowed:
        raise ChunkError(
            "bad_dtype", f"{what}: dtype {_dtype_name(t.dtype)} is not allowed; use {_names(allowed)}"
        )
    shape = tuple(int(d) for d in t.shape)
    if len(shape) != ndim or any(d < 0 for d in shape):
        raise ChunkError("bad_shape", f"{what}: shape {list(shape)} must have {ndim} non-negative dimensions")
    expected = math.prod(shape) * ITEMSIZE[t.dtype]
    raw = t.raw_contents
    if len(raw) != expected:
        raise ChunkError(
            "byte_length_mismatch",
            f"{what}: {len(raw)} bytes but shape {list(shape)} of {_dtype_name(t.dtype)} "
            f"needs {expected}; send raw little-endian row-major bytes",
        )
    return shape, raw


def _names(codes: tuple[int, ...]) -> str:
    return ", ".join(_dtype_name(c) for c in codes)


def _view(raw: bytes, code: int, shape: tuple[int, ...]) -> npt.NDArray[np.generic]:
    return np.frombuffer(raw, dtype=NUMPY_DTYPES[code]).reshape(shape)


def decode_chunk(chunk: service_pb2.Chunk, num_classes: int, max_rows: int) -> DecodedChunk:
    """The chunk's scores [n, C], labels [n] and optional sample ids [n], as views over its bytes."""
    scores_t = chunk.scores
    if scores_t.dtype in SCORE_DTYPES and len(scores_t.shape) >= 1 and scores_t.shape[0] > max_rows:
        raise ChunkError(
            "chunk_too_large",
            f"scores: {scores_t.shape[0]} rows exceed the server's max_chunk_rows={max_rows}; "
            "send smaller chunks",
        )
    shape, raw = _check(scores_t, "scores", SCORE_DTYPES, 2)
    n, c = shape
    if c != num_classes:
        raise ChunkError(
            "shape_mismatch",
            f"scores: shape {list(shape)} has {c} classes but the shard opened with {num_classes}",
        )
    scores: Scores
    if scores_t.dtype == DT.DATA_TYPE_BFLOAT16:
        scores = (
            torch.frombuffer(raw, dtype=torch.bfloat16).reshape(n, c)
            if n
            else torch.empty((0, c), dtype=torch.bfloat16)
        )
    else:
        scores = _view(raw, scores_t.dtype, shape)  # type: ignore[assignment]
    label_shape, label_raw = _check(chunk.labels, "labels", INDEX_DTYPES, 1)
    if label_shape[0] != n:
        raise ChunkError("label_count_mismatch", f"labels: {label_shape[0]} labels for {n} rows of scores")
    labels = _view(label_raw, chunk.labels.dtype, label_shape)
    sample_ids = None
    if chunk.HasField("sample_ids"):
        id_shape, id_raw = _check(chunk.sample_ids, "sample_ids", INDEX_DTYPES, 1)
        if id_shape[0] != n:
            raise ChunkError("label_count_mismatch", f"sample_ids: {id_shape[0]} ids for {n} rows of scores")
        ids = _view(id_raw, chunk.sample_ids.dtype, id_shape)
        sample_ids = ids if ids.dtype == np.int64 else ids.astype(np.int64)
    return DecodedChunk(scores, labels, sample_ids, len(raw))  # type: ignore[arg-type]


def encode_tensor(array: npt.ArrayLike | torch.Tensor) -> tensor_pb2.Tensor:
    """A numpy array or torch tensor as a proto Tensor (one copy into the message bytes)."""
    if isinstance(array, torch.Tensor):
        t = array.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            raw = t.view(torch.int16).numpy().astype("<i2", copy=False).tobytes()
            return tensor_pb2.Tensor(dtype=DT.DATA_TYPE_BFLOAT16, shape=list(t.shape), raw_contents=raw)
        array = t.numpy()
    arr = np.asarray(array)
    for code, dt in NUMPY_DTYPES.items():
        if arr.dtype == dt or arr.dtype == dt.newbyteorder("="):
            le = np.ascontiguousarray(arr, dtype=dt)
            return tensor_pb2.Tensor(
                dtype=code,  # type: ignore[arg-type]
                shape=list(arr.shape),
                raw_contents=le.tobytes(),
            )
    raise TypeError(f"cannot encode dtype {arr.dtype}; use float32, float16, bfloat16, int32 or int64")
