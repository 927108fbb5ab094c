"""The StreamEvaluation wire format, both directions, for the client and the server alike.

A chunk request is mostly two or three tensor payloads of about 1 MiB. protobuf copies a bytes field
each time a message is built, serialized or read, which for such payloads costs as much as
everything else at either end; so the client writes chunk requests by hand
(:func:`encode_chunk_request`: a few tags and lengths joined with the arrays, one copy) and the
server reads them by hand (:func:`parse_stream_request`: memoryviews of the received bytes, no
copy). Everything else (open, close, and any chunk that is not in the plain form read here) goes
through protobuf unchanged, so unknown fields are refused and malformed input fails as protobuf
makes it fail.

Every field number and wire type comes from the generated descriptors, never from a literal, and
fields are written in protobuf's order (by number): a change to ``proto/evalstream/v1`` either
flows through or stops the import (``_field``). tests/service/test_wire_contract.py checks both
directions against protobuf under a renumbered contract.

Payloads are read through a dispatch table (``_PAYLOADS``: the request field's tag -> reader), so a
second payload kind sits beside the chunk as one more reader (built from ``_varint``, ``_length``,
``_tensor``) and one more encoder (from ``_in_order``, ``_len_parts``, ``_tensor_parts``).

Constants both ends share are defined only here: dtype codes and their numpy forms, score kinds,
the legacy acknowledgement metadata. torch is never imported: a torch tensor can only be passed in
by a caller that has imported it already (:func:`host_array`).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from evalstream.v1 import evaluation_pb2, service_pb2, tensor_pb2

DT = tensor_pb2.DataType

# -- the contract's numbers, read from the generated descriptors -------------------------------------

_VARINT, _LEN = 0, 2
_T = FieldDescriptor


def _field(message: type[Message], name: str, kind: int, *, repeated: bool = False) -> int:
    """The number of ``message.name``; at import, an error if the contract changed its type.

    This module reads and writes each field in one wire form; a field whose type or cardinality
    changed in the .proto would silently be read wrong, so it stops the import instead.
    """
    fd = message.DESCRIPTOR.fields_by_name[name]
    if fd.type != kind or fd.is_repeated != repeated:
        where = f"{message.DESCRIPTOR.full_name}.{name}"
        raise ImportError(f"{where} changed its type or cardinality; evalstream/wire.py must follow")
    return fd.number


_REQUEST, _CHUNK, _TENSOR = service_pb2.StreamEvaluationRequest, service_pb2.Chunk, tensor_pb2.Tensor
REQUEST_CHUNK = _field(_REQUEST, "chunk", _T.TYPE_MESSAGE)
CHUNK_SEQUENCE = _field(_CHUNK, "sequence", _T.TYPE_UINT64)
CHUNK_SCORES = _field(_CHUNK, "scores", _T.TYPE_MESSAGE)
CHUNK_LABELS = _field(_CHUNK, "labels", _T.TYPE_MESSAGE)
CHUNK_SAMPLE_IDS = _field(_CHUNK, "sample_ids", _T.TYPE_MESSAGE)
TENSOR_DTYPE = _field(_TENSOR, "dtype", _T.TYPE_ENUM)
TENSOR_SHAPE = _field(_TENSOR, "shape", _T.TYPE_INT64, repeated=True)  # packed: proto3's default
TENSOR_RAW = _field(_TENSOR, "raw_contents", _T.TYPE_BYTES)
_RECORDS = service_pb2.RecordsChunk
REQUEST_RECORDS = _field(_REQUEST, "records", _T.TYPE_MESSAGE)
RECORDS_SEQUENCE = _field(_RECORDS, "sequence", _T.TYPE_UINT64)
RECORDS_LAYOUT_VERSION = _field(_RECORDS, "layout_version", _T.TYPE_UINT32)
RECORDS_ROWS = _field(_RECORDS, "rows", _T.TYPE_UINT64)
RECORDS_COLUMNS = _field(_RECORDS, "columns", _T.TYPE_BYTES)


def _tag(number: int, wire_type: int) -> int:
    return number << 3 | wire_type


# -- constants both ends share ------------------------------------------------------------------------

# The gRPC metadata clients before OpenShard.ack_mode sent to ask for cumulative acknowledgements;
# servers keep honouring it for them.
ACKS_METADATA = ("evalstream-acks", "cumulative")

# Score kinds by their engine name; an unset kind is logits.
SCORE_KINDS: dict[str, evaluation_pb2.ScoreKind] = {
    "logits": evaluation_pb2.SCORE_KIND_LOGITS,
    "log_probabilities": evaluation_pb2.SCORE_KIND_LOG_PROBABILITIES,
}
SCORE_KIND_NAMES: dict[int, str] = {
    evaluation_pb2.SCORE_KIND_UNSPECIFIED: "logits",
    **{code: name for name, code in SCORE_KINDS.items()},
}

# Wire dtype codes by numpy/torch dtype name, and how numpy holds each. numpy has no bfloat16: its
# values travel through numpy as their 16-bit patterns (int16), at both ends.
DTYPE_CODES: dict[str, tensor_pb2.DataType] = {
    "float32": DT.DATA_TYPE_FLOAT32,
    "float16": DT.DATA_TYPE_FLOAT16,
    "bfloat16": DT.DATA_TYPE_BFLOAT16,
    "int32": DT.DATA_TYPE_INT32,
    "int64": DT.DATA_TYPE_INT64,
}
HOST_DTYPES: dict[int, np.dtype[Any]] = {
    DT.DATA_TYPE_FLOAT32: np.dtype("<f4"),
    DT.DATA_TYPE_FLOAT16: np.dtype("<f2"),
    DT.DATA_TYPE_BFLOAT16: np.dtype("<i2"),
    DT.DATA_TYPE_INT32: np.dtype("<i4"),
    DT.DATA_TYPE_INT64: np.dtype("<i8"),
}
ITEMSIZE: dict[int, int] = {code: dt.itemsize for code, dt in HOST_DTYPES.items()}
SCORE_DTYPES = (DT.DATA_TYPE_FLOAT32, DT.DATA_TYPE_FLOAT16, DT.DATA_TYPE_BFLOAT16)
INDEX_DTYPES = (DT.DATA_TYPE_INT32, DT.DATA_TYPE_INT64)


def imported_torch() -> Any:
    """The torch module if the process has finished importing it, else None (never imported here).

    A module another thread is still importing is in ``sys.modules`` half built (no ``Tensor``
    or ``cuda`` yet): it counts as not imported, which is true of every value a caller can hold,
    since no tensor exists before torch's import completes.
    """
    torch = sys.modules.get("torch")
    if torch is None or getattr(getattr(torch, "__spec__", None), "_initializing", False):
        return None
    return torch


def is_tensor(x: object) -> bool:
    torch = imported_torch()
    return torch is not None and isinstance(x, torch.Tensor)


def host_array(x: Any) -> npt.NDArray[Any]:
    """A numpy view of a host torch tensor or array, bfloat16 as its int16 bit patterns (numpy has no
    bfloat16; an ``ml_dtypes`` array is viewed the same way); other arrays as they are.

    The one place bfloat16 becomes int16: the client's host copies, the server's staging blocks and
    :func:`encode_tensor` all read it through here.
    """
    if not is_tensor(x):
        a = np.asarray(x)
        return a.view(np.int16) if a.dtype.name == "bfloat16" else a  # e.g. ml_dtypes.bfloat16
    if x.dtype == imported_torch().bfloat16:
        x = x.view(imported_torch().int16)
    view: npt.NDArray[Any] = x.numpy()
    return view


# -- writing ------------------------------------------------------------------------------------------


_MASK64 = (1 << 64) - 1
_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def _varint_bytes(value: int) -> bytes:
    if value < 0x80:
        return _ONE_BYTE[value]  # every tag and most lengths and dtypes: no loop
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


@functools.cache
def _key(number: int, wire_type: int) -> bytes:
    """A field's encoded tag (computed once per field)."""
    return _varint_bytes(_tag(number, wire_type))


def len_field(number: int, payload_len: int) -> bytes:
    """Tag and length of a length-delimited field."""
    return _key(number, _LEN) + _varint_bytes(payload_len)


def varint_field(number: int, value: int) -> bytes:
    """A varint field as protobuf writes it: nothing at all for proto3's default 0."""
    return _key(number, _VARINT) + _varint_bytes(value) if value else b""


Part = bytes | memoryview


def _in_order(*numbers: int) -> Callable[[dict[int, list[Part]]], list[Part]]:
    """The joiner of one message kind: its fields' parts in protobuf's order (by number), the order
    worked out once here rather than per message."""
    order = sorted(numbers)

    def join(fields: dict[int, list[Part]]) -> list[Part]:
        return [part for n in order if n in fields for part in fields[n]]

    return join


def _len_parts(number: int, parts: list[Part]) -> list[Part]:
    """A length-delimited field around ``parts`` (a nested message or a payload), not copying them."""
    return [len_field(number, sum(map(len, parts))), *parts]


_tensor_message = _in_order(TENSOR_DTYPE, TENSOR_SHAPE, TENSOR_RAW)
_chunk_message = _in_order(CHUNK_SEQUENCE, CHUNK_SCORES, CHUNK_LABELS, CHUNK_SAMPLE_IDS)


def _tensor_parts(dtype: int, array: npt.NDArray[Any]) -> list[Part]:
    """A Tensor message as the parts to join, the payload a view of ``array`` (not copied)."""
    fields: dict[int, list[Part]] = {TENSOR_DTYPE: [varint_field(TENSOR_DTYPE, dtype)]}
    if array.ndim:
        dims = b"".join([_varint_bytes(int(d) & _MASK64) for d in array.shape])
        fields[TENSOR_SHAPE] = _len_parts(TENSOR_SHAPE, [dims])
    if array.nbytes:
        fields[TENSOR_RAW] = _len_parts(TENSOR_RAW, [np.ascontiguousarray(array).data.cast("B")])
    return _tensor_message(fields)


class WireTensor(NamedTuple):
    """An array to send and its wire dtype code (bfloat16 arrives here as int16 bit patterns)."""

    dtype: int
    array: npt.NDArray[Any]


def encode_chunk_request(
    sequence: int, scores: WireTensor, labels: WireTensor, sample_ids: WireTensor | None
) -> bytes:
    """A serialized ``StreamEvaluationRequest{chunk}``, byte for byte what protobuf writes, with one
    copy of the arrays (protobuf would copy each payload once per nesting level and again to
    serialize: ~1.5 ms per 1 MiB chunk, more than the rest of the client together)."""
    fields: dict[int, list[Part]] = {
        CHUNK_SEQUENCE: [varint_field(CHUNK_SEQUENCE, sequence)],
        CHUNK_SCORES: _len_parts(CHUNK_SCORES, _tensor_parts(*scores)),
        CHUNK_LABELS: _len_parts(CHUNK_LABELS, _tensor_parts(*labels)),
    }
    if sample_ids is not None:
        fields[CHUNK_SAMPLE_IDS] = _len_parts(CHUNK_SAMPLE_IDS, _tensor_parts(*sample_ids))
    return b"".join(_len_parts(REQUEST_CHUNK, _chunk_message(fields)))


def encode_tensor(array: Any) -> tensor_pb2.Tensor:
    """A numpy array or torch tensor (any device) as a protobuf ``Tensor`` (the slow, simple path:
    tests, tools and the rare request not worth hand-encoding)."""
    if is_tensor(array):
        array = array.detach().cpu().contiguous()
        name = str(array.dtype).rsplit(".", 1)[-1]
    else:
        array = np.asarray(array)
        name = array.dtype.name
    code = DTYPE_CODES.get(name)
    if code is None:
        raise TypeError(f"cannot encode dtype {name}; use float32, float16, bfloat16, int32 or int64")
    host = np.ascontiguousarray(host_array(array), dtype=HOST_DTYPES[code])
    return tensor_pb2.Tensor(dtype=code, shape=list(host.shape), raw_contents=host.tobytes())


# -- reading ------------------------------------------------------------------------------------------

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


_DTYPE_TAG = _tag(TENSOR_DTYPE, _VARINT)
_SHAPE_TAG = _tag(TENSOR_SHAPE, _LEN)
_RAW_TAG = _tag(TENSOR_RAW, _LEN)


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


_SEQUENCE_TAG = _tag(CHUNK_SEQUENCE, _VARINT)
# Tensor fields of a chunk by tag, as their index in RawChunk's (scores, labels, sample_ids).
_CHUNK_TENSORS = {_tag(n, _LEN): i for i, n in enumerate((CHUNK_SCORES, CHUNK_LABELS, CHUNK_SAMPLE_IDS))}


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
    _tag(n, _VARINT): i for i, n in enumerate((RECORDS_SEQUENCE, RECORDS_LAYOUT_VERSION, RECORDS_ROWS))
}
_COLUMNS_TAG = _tag(RECORDS_COLUMNS, _LEN)
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
    _tag(REQUEST_CHUNK, _LEN): _chunk,
    _tag(REQUEST_RECORDS, _LEN): _records,
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
