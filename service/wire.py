"""Proto ``Tensor`` <-> numpy/torch without copies, and the chunk request read straight off the wire.

Decoding views the tensor bytes in place (``numpy.frombuffer``), so the only copy of a chunk's rows
on the server is the one into its staging block. ``parse_stream_request`` is the
``StreamEvaluation`` request deserializer: a chunk request is read directly from the received
bytes (sequence, dtypes, shapes, memoryviews of the payloads) without building protobuf messages,
because protobuf copies a bytes field when it is read, which for a 1 MiB tensor costs as much as
the staging copy itself. Anything else (open, close, and every chunk that is not in the plain
form the parser knows: unknown, repeated or unpacked fields, odd wire types) is handed to protobuf
unchanged, so unknown fields are refused and malformed input fails exactly as before.

Every malformed tensor becomes a ``ChunkError`` with a stable reason
(``dtype_unspecified``, ``bad_dtype``, ``bad_shape``, ``shape_mismatch``,
``byte_length_mismatch``, ``chunk_too_large``, ``label_count_mismatch``), which
the servicer returns in-band so the stream survives.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from evalstream.service.engine.errors import ChunkError
from evalstream.v1 import service_pb2, tensor_pb2

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
TORCH_SCORE_DTYPES: dict[int, torch.dtype] = {
    DT.DATA_TYPE_FLOAT32: torch.float32,
    DT.DATA_TYPE_FLOAT16: torch.float16,
    DT.DATA_TYPE_BFLOAT16: torch.bfloat16,
}
# numpy has no bfloat16: its scores travel through numpy as their 16-bit patterns.
_HOST_DTYPES: dict[int, np.dtype] = {**NUMPY_DTYPES, DT.DATA_TYPE_BFLOAT16: np.dtype("<i2")}

Scores = npt.NDArray[np.floating] | torch.Tensor
Buffer = bytes | memoryview


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


class RawTensor(NamedTuple):
    """A Tensor message's fields: dtype code, shape, and the payload (a view of the received bytes)."""

    dtype: int
    shape: tuple[int, ...]
    raw: Buffer


# An absent Tensor reads as protobuf's default instance.
EMPTY_TENSOR = RawTensor(DT.DATA_TYPE_UNSPECIFIED, (), b"")


@dataclass
class RawChunk:
    """A Chunk message read off the wire without protobuf; ``sample_ids`` is None when absent."""

    sequence: int
    scores: RawTensor
    labels: RawTensor
    sample_ids: RawTensor | None


def raw_chunk(chunk: service_pb2.Chunk) -> RawChunk:
    """A protobuf Chunk as a RawChunk (each ``raw_contents`` read once: protobuf copies it per read)."""

    def tensor(t: tensor_pb2.Tensor) -> RawTensor:
        return RawTensor(t.dtype, tuple(t.shape), t.raw_contents)

    ids = tensor(chunk.sample_ids) if chunk.HasField("sample_ids") else None
    return RawChunk(chunk.sequence, tensor(chunk.scores), tensor(chunk.labels), ids)


# -- the wire format --------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_INT32_MAX = (1 << 31) - 1


class _Unusual(Exception):
    """Not the plain form this parser reads; protobuf parses it instead."""


def _varint(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """A base-128 varint at ``pos``: (value, next position). At most 10 bytes and 64 bits."""
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Unusual
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            if value > _MASK64:
                raise _Unusual
            return value, pos
        shift += 7


def _length(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """A length prefix: (end of the field's payload, start of the payload)."""
    n, pos = _varint(buf, pos, end)
    if pos + n > end:
        raise _Unusual
    return pos + n, pos


def _tensor(buf: memoryview, pos: int, end: int) -> RawTensor:
    dtype = 0
    shape: tuple[int, ...] = ()
    raw: Buffer = b""
    seen = 0
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        if tag not in (0x08, 0x12, 0x1A) or seen & (1 << (tag >> 3)):
            raise _Unusual  # unknown, unpacked or of another wire type; or repeated (protobuf merges)
        seen |= 1 << (tag >> 3)
        if tag == 0x08:  # dtype, varint
            dtype, pos = _varint(buf, pos, end)
            if dtype > _INT32_MAX:
                raise _Unusual  # negative or truncated enum values
        elif tag == 0x12:  # shape, packed int64
            stop, pos = _length(buf, pos, end)
            dims = []
            while pos < stop:
                d, pos = _varint(buf, pos, stop)
                dims.append(d - (1 << 64) if d >= 1 << 63 else d)
            shape = tuple(dims)
        else:  # raw_contents
            stop, pos = _length(buf, pos, end)
            raw = buf[pos:stop]
            pos = stop
    return RawTensor(dtype, shape, raw)


def parse_chunk_request(data: bytes) -> RawChunk | None:
    """A serialized StreamEvaluationRequest carrying a plain Chunk, read without protobuf; else None.

    Plain means: the request holds only its ``chunk`` field; the chunk only ``sequence`` (varint)
    and ``scores``/``labels``/``sample_ids``; each tensor only ``dtype``, packed ``shape`` and
    ``raw_contents``; no field twice. Whatever protobuf would read differently (merged repeats,
    unknown fields, unpacked shapes, wrong wire types, truncation) is None, for protobuf to parse.
    """
    buf = memoryview(data)
    size = len(buf)
    try:
        if size < 2 or buf[0] != 0x12:
            return None
        end, pos = _length(buf, 1, size)
        if end != size:
            return None
        sequence = 0
        tensors: list[RawTensor | None] = [None, None, None]
        seen = 0
        while pos < end:
            tag, pos = _varint(buf, pos, end)
            field = tag >> 3
            if tag & 7 != (0 if field == 1 else 2) or not 1 <= field <= 4 or seen & (1 << field):
                return None
            seen |= 1 << field
            if field == 1:
                sequence, pos = _varint(buf, pos, end)
            else:
                stop, pos = _length(buf, pos, end)
                tensors[field - 2] = _tensor(buf, pos, stop)
                pos = stop
    except _Unusual:
        return None
    scores, labels, ids = tensors
    return RawChunk(sequence, scores or EMPTY_TENSOR, labels or EMPTY_TENSOR, ids)


def parse_stream_request(data: bytes) -> RawChunk | service_pb2.StreamEvaluationRequest:
    """The StreamEvaluation request deserializer: a RawChunk for plain chunks, protobuf otherwise."""
    chunk = parse_chunk_request(data)
    return chunk if chunk is not None else service_pb2.StreamEvaluationRequest.FromString(data)


# -- decoding ---------------------------------------------------------------------------------------


def _dtype_name(code: int) -> str:
    try:
        return DT.Name(code)
    except ValueError:
        return str(code)


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


def _names(codes: tuple[int, ...]) -> str:
    return ", ".join(_dtype_name(c) for c in codes)


def _view(t: RawTensor, shape: tuple[int, ...]) -> npt.NDArray[np.generic]:
    return np.frombuffer(t.raw, dtype=_HOST_DTYPES[t.dtype]).reshape(shape)


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
