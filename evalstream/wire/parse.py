"""Reading StreamEvaluation requests by hand: memoryviews of the received bytes, no copy.

protobuf copies each bytes field once to parse and again on every read; for ~1 MiB payloads that is
most of the server's cost per chunk. So a request in plain form (one payload; known fields, each
once, in their usual wire form) is read here, and anything else (open, close, and any payload not
in that form) goes to protobuf unchanged, so unknown fields are refused and malformed input fails
as protobuf makes it fail. tests/service/test_wire_parser.py pins this reader to protobuf.

Payloads are read through a dispatch table (``_PAYLOADS``: the request field's tag -> reader): a
second payload kind sits beside the chunk as one more reader built from ``_varint``, ``_length`` and
``_tensor``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

from evalstream.v1 import service_pb2, tensor_pb2
from evalstream.wire.contract import (
    CHUNK_LABELS,
    CHUNK_SAMPLE_IDS,
    CHUNK_SCORES,
    CHUNK_SEQUENCE,
    DT,
    LEN,
    MASK64,
    RECORDS_COLUMNS,
    RECORDS_LAYOUT_VERSION,
    RECORDS_ROWS,
    RECORDS_SEQUENCE,
    REQUEST_CHUNK,
    REQUEST_RECORDS,
    TENSOR_DTYPE,
    TENSOR_RAW,
    TENSOR_SHAPE,
    VARINT,
    tag,
)
from evalstream.wire.encode import Part

Buffer = Part
_INT32_MAX = (1 << 31) - 1


class RawTensor(NamedTuple):
    """A Tensor message's fields: dtype code, shape, and the payload (a view of the received bytes)."""

    dtype: int
    shape: tuple[int, ...]
    raw: Buffer


# An absent Tensor reads as protobuf's default instance.
EMPTY_TENSOR = RawTensor(DT.DATA_TYPE_UNSPECIFIED, (), b"")


class RawChunk(NamedTuple):
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


class _Unusual(Exception):
    """Not the plain form this module reads; protobuf parses it instead."""


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
            if value > MASK64:
                raise _Unusual
            return value, pos
        shift += 7


def _length(buf: Buffer, pos: int, end: int) -> tuple[int, int]:
    """A length prefix: (end of the field's payload, start of the payload)."""
    n, pos = _varint(buf, pos, end)
    if pos + n > end:
        raise _Unusual
    return pos + n, pos


_DTYPE_TAG = tag(TENSOR_DTYPE, VARINT)
_SHAPE_TAG = tag(TENSOR_SHAPE, LEN)
_RAW_TAG = tag(TENSOR_RAW, LEN)


def _tensor(buf: memoryview, pos: int, end: int) -> RawTensor:
    dtype = 0
    shape: tuple[int, ...] = ()
    raw: Buffer = b""
    seen: set[int] = set()
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        if tag not in (_DTYPE_TAG, _SHAPE_TAG, _RAW_TAG) or tag in seen:
            raise _Unusual  # unknown, unpacked or of another wire type; or repeated (protobuf merges)
        seen.add(tag)
        if tag == _DTYPE_TAG:
            dtype, pos = _varint(buf, pos, end)
            if dtype > _INT32_MAX:
                raise _Unusual  # negative or truncated enum values
        elif tag == _SHAPE_TAG:
            stop, pos = _length(buf, pos, end)
            dims = []
            while pos < stop:
                d, pos = _varint(buf, pos, stop)
                dims.append(d - (1 << 64) if d >= 1 << 63 else d)
            shape = tuple(dims)
        else:
            stop, pos = _length(buf, pos, end)
            raw = buf[pos:stop]
            pos = stop
    return RawTensor(dtype, shape, raw)


_SEQUENCE_TAG = tag(CHUNK_SEQUENCE, VARINT)
# Tensor fields of a chunk by tag, as their index in RawChunk's (scores, labels, sample_ids).
_CHUNK_TENSORS = {tag(n, LEN): i for i, n in enumerate((CHUNK_SCORES, CHUNK_LABELS, CHUNK_SAMPLE_IDS))}


def _chunk(buf: memoryview, pos: int, end: int) -> RawChunk:
    """A Chunk message in plain form: ``sequence`` (varint) and the three tensors, none twice."""
    sequence = 0
    tensors: list[RawTensor | None] = [None, None, None]
    seen: set[int] = set()
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        if tag in seen or (tag != _SEQUENCE_TAG and tag not in _CHUNK_TENSORS):
            raise _Unusual
        seen.add(tag)
        if tag == _SEQUENCE_TAG:
            sequence, pos = _varint(buf, pos, end)
        else:
            stop, pos = _length(buf, pos, end)
            tensors[_CHUNK_TENSORS[tag]] = _tensor(buf, pos, stop)
            pos = stop
    scores, labels, ids = tensors
    return RawChunk(sequence, scores or EMPTY_TENSOR, labels or EMPTY_TENSOR, ids)


class RawRecords(NamedTuple):
    """A RecordsChunk read off the wire: its fields as protobuf would read them, ``columns`` a view of
    the received bytes (protobuf would copy them once to parse and once more on each read)."""

    sequence: int
    layout_version: int
    rows: int
    columns: Buffer


# RecordsChunk's varint fields by tag, as their index in (sequence, layout_version, rows).
_RECORDS_VARINTS = {
    tag(n, VARINT): i for i, n in enumerate((RECORDS_SEQUENCE, RECORDS_LAYOUT_VERSION, RECORDS_ROWS))
}
_COLUMNS_TAG = tag(RECORDS_COLUMNS, LEN)
_UINT32_MAX = (1 << 32) - 1


def _records(buf: memoryview, pos: int, end: int) -> RawRecords:
    """A RecordsChunk message in plain form: its three varints and ``columns``, none twice."""
    values = [0, 0, 0]
    columns: Buffer = b""
    seen: set[int] = set()
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        if tag in seen or (tag != _COLUMNS_TAG and tag not in _RECORDS_VARINTS):
            raise _Unusual
        seen.add(tag)
        if tag == _COLUMNS_TAG:
            stop, pos = _length(buf, pos, end)
            columns = buf[pos:stop]
            pos = stop
        else:
            index = _RECORDS_VARINTS[tag]
            values[index], pos = _varint(buf, pos, end)
            if index == 1 and values[index] > _UINT32_MAX:
                raise _Unusual  # protobuf truncates a uint32 to its low 32 bits
    return RawRecords(values[0], values[1], values[2], columns)


# The request payloads read without protobuf, by the tag of their field in StreamEvaluationRequest.
Payload = RawChunk | RawRecords
_PAYLOADS: dict[int, Callable[[memoryview, int, int], Payload]] = {
    tag(REQUEST_CHUNK, LEN): _chunk,
    tag(REQUEST_RECORDS, LEN): _records,
}


def parse_payload(data: bytes) -> Payload | None:
    """A serialized StreamEvaluationRequest holding only a payload in plain form, read without
    protobuf; None for anything else.

    Plain means: the request holds only that one field; the chunk only ``sequence`` and
    ``scores``/``labels``/``sample_ids``; each tensor only ``dtype``, packed ``shape`` and
    ``raw_contents``; no field twice. Whatever protobuf would read differently (merged repeats,
    unknown fields, unpacked shapes, wrong wire types, truncation) is None, for protobuf to parse.
    """
    buf = memoryview(data)
    size = len(buf)
    try:
        tag, pos = _varint(buf, 0, size)
        reader = _PAYLOADS.get(tag)
        if reader is None:
            return None
        end, pos = _length(buf, pos, size)
        return reader(buf, pos, end) if end == size else None
    except _Unusual:
        return None


def parse_chunk_request(data: bytes) -> RawChunk | None:
    """:func:`parse_payload` for chunk requests only (None for any other request)."""
    payload = parse_payload(data)
    return payload if isinstance(payload, RawChunk) else None


def parse_stream_request(data: bytes) -> Payload | service_pb2.StreamEvaluationRequest:
    """The StreamEvaluation request deserializer: a payload read off the wire when it is in plain
    form, a protobuf message otherwise."""
    payload = parse_payload(data)
    return payload if payload is not None else service_pb2.StreamEvaluationRequest.FromString(data)
