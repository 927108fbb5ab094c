"""Every kind of malformed request, with the status, reason and words the server must answer with.

``CHUNK_CASES`` are refused in-band (the stream goes on, the chunk's sequence is
consumed, nothing else changes); ``STREAM_CASES`` end the stream with a status;
``OPEN_CASES`` are opens the server refuses. Each builder gets a good batch to
spoil, so a case differs from a valid request only in what it tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np

from evalstream.service.engine import Records
from evalstream.service.records_wire import LAYOUT_VERSION, Layout, encode_request
from evalstream.v1 import service_pb2, tensor_pb2
from evalstream.wire import encode_tensor
from tests.robustness.conftest import MAX_CHUNK_ROWS, MAX_MESSAGE_BYTES, NUM_CLASSES
from tests.support.lockstep import Request, chunk_request, close_request, open_request

DT = tensor_pb2.DataType
UNKNOWN_FIELD = b"\xa0\x06\x01"  # field 100, varint 1: no message of this protocol has it
Batch = tuple[np.ndarray, np.ndarray]


def _wrap(field: int, payload: bytes) -> bytes:
    """A length-delimited field (a sub-message) in wire format."""
    n, out = len(payload), bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            break
    return bytes([field << 3 | 2]) + bytes(out) + payload


def _chunk(seq: int, b: Batch) -> Request:
    return chunk_request(seq, b[0], b[1])


def _scores(seq: int, b: Batch, **changes: object) -> Request:
    r = _chunk(seq, b)
    for k, v in changes.items():
        if k == "shape":
            del r.chunk.scores.shape[:]
            r.chunk.scores.shape.extend(v)  # type: ignore[arg-type]
        else:
            setattr(r.chunk.scores, k, v)
    return r


def _bad_values(value: float) -> Callable[[int, Batch], Request]:
    def build(seq: int, b: Batch) -> Request:
        s = b[0].copy()
        s[1, 3] = value
        return chunk_request(seq, s, b[1])

    return build


def _labels(values: np.ndarray) -> Callable[[int, Batch], Request]:
    def build(seq: int, b: Batch) -> Request:
        y = b[1].copy()
        y[: len(values)] = values
        return chunk_request(seq, b[0], y)

    return build


def _label_tensor(t: tensor_pb2.Tensor) -> Callable[[int, Batch], Request]:
    def build(seq: int, b: Batch) -> Request:
        r = _chunk(seq, b)
        r.chunk.labels.CopyFrom(t)
        return r

    return build


@dataclass(frozen=True)
class ChunkCase:
    name: str
    build: Callable[[int, Batch], Request]
    reason: str
    code: str = "INVALID_ARGUMENT"


CHUNK_CASES = [
    ChunkCase("dtype unset", lambda q, b: _scores(q, b, dtype=DT.DATA_TYPE_UNSPECIFIED), "dtype_unspecified"),
    ChunkCase("integer scores", lambda q, b: _scores(q, b, dtype=DT.DATA_TYPE_INT32), "bad_dtype"),
    ChunkCase("unknown dtype code", lambda q, b: _scores(q, b, dtype=99), "bad_dtype"),
    ChunkCase(
        "bytes one short",
        lambda q, b: _scores(q, b, raw_contents=b[0].tobytes()[:-1]),
        "byte_length_mismatch",
    ),
    ChunkCase(
        "bytes one over",
        lambda q, b: _scores(q, b, raw_contents=b[0].tobytes() + b"\0"),
        "byte_length_mismatch",
    ),
    ChunkCase("negative dimension", lambda q, b: _scores(q, b, shape=[-4, NUM_CLASSES]), "bad_shape"),
    ChunkCase("three dimensions", lambda q, b: _scores(q, b, shape=[4, NUM_CLASSES, 1]), "bad_shape"),
    ChunkCase("one dimension", lambda q, b: _scores(q, b, shape=[4 * NUM_CLASSES]), "bad_shape"),
    ChunkCase(
        "huge rows",
        lambda q, b: _scores(q, b, shape=[1 << 62, NUM_CLASSES]),
        "chunk_too_large",
        "RESOURCE_EXHAUSTED",
    ),
    ChunkCase("huge classes", lambda q, b: _scores(q, b, shape=[1, 1 << 62]), "byte_length_mismatch"),
    ChunkCase(
        "overflowing shape",
        lambda q, b: _scores(q, b, shape=[1 << 40, 1 << 40]),
        "chunk_too_large",
        "RESOURCE_EXHAUSTED",
    ),
    ChunkCase(
        "wrong class count",
        lambda q, b: chunk_request(q, np.zeros((4, NUM_CLASSES + 1), np.float32), b[1][:4]),
        "shape_mismatch",
    ),
    ChunkCase("fewer labels", lambda q, b: chunk_request(q, b[0], b[1][:-1]), "label_count_mismatch"),
    ChunkCase("label = num_classes", _labels(np.array([NUM_CLASSES])), "label_out_of_range"),
    ChunkCase("negative label", _labels(np.array([-1])), "label_out_of_range"),
    ChunkCase("int64 max label", _labels(np.array([np.iinfo(np.int64).max])), "label_out_of_range"),
    ChunkCase("float labels", _label_tensor(encode_tensor(np.zeros(8, np.float32))), "bad_dtype"),
    ChunkCase("NaN score", _bad_values(float("nan")), "non_finite"),
    ChunkCase("+Inf score", _bad_values(float("inf")), "non_finite"),
    ChunkCase("-Inf score", _bad_values(float("-inf")), "non_finite"),
    ChunkCase(
        "negative sample id",
        lambda q, b: chunk_request(q, b[0], b[1], np.arange(-1, len(b[1]) - 1, dtype=np.int64)),
        "sample_id_negative",
    ),
    ChunkCase(
        "too many rows",
        lambda q, b: chunk_request(
            q, np.zeros((MAX_CHUNK_ROWS + 1, NUM_CLASSES), np.float32), np.zeros(MAX_CHUNK_ROWS + 1, np.int64)
        ),
        "chunk_too_large",
        "RESOURCE_EXHAUSTED",
    ),
]


def records_open(model: str, num_classes: int, version: int = LAYOUT_VERSION) -> Request:
    """An open asking to reduce on the client, with the records layout version its engine makes."""
    r = open_request(model, num_classes)
    r.open.reduce = service_pb2.REDUCE_MODE_CLIENT
    r.open.records_layout_version = version
    return r


def records_request(seq: int, records: Records, layout: Layout) -> Request:
    return Request.FromString(encode_request(records, layout, 0, len(records), seq))


# Which record of a spoiled message is bad: the refusal must name it.
BAD_ROW = 3
RecordsBuild = Callable[[int, Records, Layout], Request]


def _spoil(column: str, value: object, row: int = BAD_ROW, extra: dict | None = None) -> RecordsBuild:
    """Good records with ``column[row]`` set to ``value`` (a whole row for a per-temperature column)."""

    def build(seq: int, rec: Records, layout: Layout) -> Request:
        bad = rec.take(np.arange(len(rec)))
        for name, v in {column: value, **(extra or {})}.items():
            getattr(bad, name)[row] = v
        return records_request(seq, bad, layout)

    return build


def _raw_records(**changes: object) -> RecordsBuild:
    def build(seq: int, rec: Records, layout: Layout) -> Request:
        r = records_request(seq, rec, layout)
        for k, v in changes.items():
            value = v(r.records) if callable(v) else v
            setattr(r.records, k, value)
        return r

    return build


@dataclass(frozen=True)
class RecordsCase:
    """A RecordsChunk the server refuses in-band; ``row`` is the record the message must name."""

    name: str
    build: RecordsBuild
    reason: str
    code: str = "INVALID_ARGUMENT"
    row: int | None = BAD_ROW


RECORDS_CASES = [
    RecordsCase(
        "layout version",
        _raw_records(layout_version=lambda m: m.layout_version + 1),
        "records_layout_version",
        row=None,
    ),
    RecordsCase(
        "bytes one short", _raw_records(columns=lambda m: m.columns[:-1]), "byte_length_mismatch", row=None
    ),
    RecordsCase(
        "bytes one over", _raw_records(columns=lambda m: m.columns + b"\0"), "byte_length_mismatch", row=None
    ),
    RecordsCase("rows miscounted", _raw_records(rows=lambda m: m.rows + 1), "byte_length_mismatch", row=None),
    RecordsCase(
        "too many rows",
        _raw_records(rows=1 << 40),
        "chunk_too_large",
        "RESOURCE_EXHAUSTED",
        row=None,
    ),
    RecordsCase("label = num_classes", _spoil("label", NUM_CLASSES), "label_out_of_range"),
    RecordsCase("negative label", _spoil("label", -1), "label_out_of_range"),
    RecordsCase("pred = num_classes", _spoil("pred", NUM_CLASSES, extra={"rank": 1}), "pred_out_of_range"),
    RecordsCase("negative pred", _spoil("pred", -7, extra={"rank": 1}), "pred_out_of_range"),
    RecordsCase(
        "rank 0 but pred != label",
        _spoil("rank", 0, extra={"label": 1, "pred": 2}),
        "rank_inconsistent",
    ),
    RecordsCase(
        "rank > 0 but pred == label",
        _spoil("rank", 2, extra={"label": 1, "pred": 1}),
        "rank_inconsistent",
    ),
    RecordsCase("rank = num_classes", _spoil("rank", NUM_CLASSES), "rank_out_of_range"),
    RecordsCase(
        "label ties the maximum but pred is above it",
        _spoil("rank", 0, extra={"ties": 1, "label": 1, "pred": 2}),
        "rank_inconsistent",
    ),
    RecordsCase("ties beyond the other classes", _spoil("ties", NUM_CLASSES), "ties_out_of_range"),
    RecordsCase(
        "rank and ties beyond the other classes",
        _spoil("rank", NUM_CLASSES - 2, extra={"ties": 2, "label": 1, "pred": 2}),
        "ties_out_of_range",
    ),
    RecordsCase("NaN nll", _spoil("nll", float("nan")), "non_finite"),
    RecordsCase("Inf residual log-sum", _spoil("log_rest", float("inf")), "non_finite"),
    RecordsCase("NaN confidence", _spoil("confidence", float("nan")), "non_finite"),
    RecordsCase("negative nll", _spoil("nll", -0.5), "record_out_of_bounds"),
    RecordsCase("a positive rest slope", _spoil("rest_slope", 1.0), "record_out_of_bounds"),
    RecordsCase("a negative rest curvature", _spoil("rest_curvature", -1.0), "record_out_of_bounds"),
    RecordsCase(
        "a residual log-sum above log C",
        _spoil("log_rest", float(np.log(NUM_CLASSES)) + 0.01),
        "record_out_of_bounds",
    ),
    RecordsCase("Inf rest curvature", _spoil("rest_curvature", float("inf")), "non_finite"),
    RecordsCase("brier above 2", _spoil("brier", 2.5), "record_out_of_bounds"),
    RecordsCase("negative brier", _spoil("brier", -0.1), "record_out_of_bounds"),
    RecordsCase(
        "entropy above log C", _spoil("entropy", float(np.log(NUM_CLASSES)) + 0.01), "record_out_of_bounds"
    ),
    RecordsCase("negative entropy", _spoil("entropy", -0.01), "record_out_of_bounds"),
    RecordsCase("confidence below 1/C", _spoil("confidence", 0.5 / NUM_CLASSES), "record_out_of_bounds"),
    RecordsCase("confidence above 1", _spoil("confidence", 1.01), "record_out_of_bounds"),
    RecordsCase("sample id below -1", _spoil("sample_id", -5), "sample_id_negative"),
    RecordsCase("one record without its id", _spoil("sample_id", -1), "sample_id_negative"),
]


@dataclass(frozen=True)
class StreamCase:
    """A request (after a good open and one good chunk, unless ``opened`` is False) that ends the stream."""

    name: str
    build: Callable[[int, Batch], Request | bytes]
    code: grpc.StatusCode
    words: str
    opened: bool = True
    closed_first: bool = False


def _unknown_in_chunk(seq: int, b: Batch) -> bytes:
    return _wrap(2, _chunk(seq, b).chunk.SerializeToString() + UNKNOWN_FIELD)


def _unknown_in_tensor(seq: int, b: Batch) -> bytes:
    c = _chunk(seq, b).chunk
    labels = c.labels.SerializeToString() + UNKNOWN_FIELD
    c.ClearField("labels")
    return _wrap(2, c.SerializeToString() + _wrap(3, labels))


STREAM_CASES = [
    StreamCase(
        "message over max_message_bytes",
        lambda q, b: chunk_request(
            q, np.zeros((MAX_MESSAGE_BYTES // (4 * NUM_CLASSES) + 8, NUM_CLASSES), np.float32), b[1]
        ),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "",
    ),
    StreamCase(
        "unknown field in the request",
        lambda q, b: _chunk(q, b).SerializeToString() + UNKNOWN_FIELD,
        grpc.StatusCode.INVALID_ARGUMENT,
        "does not know",
    ),
    StreamCase(
        "unknown field in a chunk",
        _unknown_in_chunk,
        grpc.StatusCode.INVALID_ARGUMENT,
        "StreamEvaluationRequest.chunk field 100",
    ),
    StreamCase(
        "unknown field in a tensor",
        _unknown_in_tensor,
        grpc.StatusCode.INVALID_ARGUMENT,
        "chunk.labels field 100",
    ),
    StreamCase(
        "corrupt protobuf",
        lambda q, b: b"\x12\xff\xff\xff\x0f",
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a valid",
    ),
    StreamCase(
        "empty request", lambda q, b: b"", grpc.StatusCode.INVALID_ARGUMENT, "set open, chunk or close"
    ),
    StreamCase(
        "sequence gap", lambda q, b: _chunk(q + 5, b), grpc.StatusCode.FAILED_PRECONDITION, "sequence gap"
    ),
    StreamCase(
        "close miscounts", lambda q, b: close_request(q + 3), grpc.StatusCode.FAILED_PRECONDITION, "resend"
    ),
    StreamCase(
        "second open on one stream",
        lambda q, b: open_request("whatever", NUM_CLASSES),
        grpc.StatusCode.FAILED_PRECONDITION,
        "already opened",
    ),
    StreamCase(
        "chunk without open", _chunk, grpc.StatusCode.FAILED_PRECONDITION, "OpenShard first", opened=False
    ),
    StreamCase(
        "close without open",
        lambda q, b: close_request(0),
        grpc.StatusCode.FAILED_PRECONDITION,
        "OpenShard",
        opened=False,
    ),
    StreamCase("chunk after close", _chunk, grpc.StatusCode.FAILED_PRECONDITION, "closed", closed_first=True),
    StreamCase(
        "records on a shard the server reduces",
        lambda q, b: Request(records=service_pb2.RecordsChunk(sequence=q, layout_version=LAYOUT_VERSION)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "REDUCE_MODE_CLIENT",
    ),
    StreamCase(
        "records without open",
        lambda q, b: Request(records=service_pb2.RecordsChunk(sequence=0, layout_version=LAYOUT_VERSION)),
        grpc.StatusCode.FAILED_PRECONDITION,
        "OpenShard first",
        opened=False,
    ),
]


@dataclass(frozen=True)
class OpenCase:
    name: str
    build: Callable[[str], Request | bytes]  # model name -> the refused open
    code: grpc.StatusCode
    words: str


def _open(target: str, /, **changes: object) -> Request:
    """Rank 1 of the 2-rank evaluation ``target``, with ``changes`` spoiling it."""
    r = open_request(target, NUM_CLASSES, rank=1, world_size=2)
    for k, v in changes.items():
        if k in ("run", "model", "split", "step"):
            setattr(r.open.key, k, v)
        else:
            setattr(r.open, k, v)
    return r


def _named(what: str, name: str) -> Callable[[str], Request]:
    return lambda target: _open(target, **{what: name})


def _non_utf8(model: str) -> bytes:
    return _open(model, run="RUNX").SerializeToString().replace(b"RUNX", b"R\xff\xfeX")


BAD_NAMES = [
    "",
    "a/b",
    "../etc",
    ".hidden",
    "-x",
    "a b",
    "tab\there",
    "new\nline",
    "x" * 129,
    "modèle",
    "a\0b",
    'quote"s',
    "{label}",
    "a\\b",
]

OPEN_CASES = [
    OpenCase(
        "world size 0",
        lambda m: _open(m, world_size=0, rank=0),
        grpc.StatusCode.INVALID_ARGUMENT,
        "world_size",
    ),
    OpenCase(
        "absurd world size",
        lambda m: _open(m, world_size=(1 << 32) - 1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "over the maximum",
    ),
    OpenCase(
        "rank >= world size", lambda m: _open(m, rank=2), grpc.StatusCode.INVALID_ARGUMENT, "out of range"
    ),
    OpenCase("one class", lambda m: _open(m, num_classes=1), grpc.StatusCode.INVALID_ARGUMENT, "num_classes"),
    OpenCase(
        "absurd class count",
        lambda m: _open(m, num_classes=(1 << 32) - 1),
        grpc.StatusCode.INVALID_ARGUMENT,
        "would not fit",
    ),
    OpenCase(
        "class count disagrees",
        lambda m: _open(m, num_classes=NUM_CLASSES + 1),
        grpc.StatusCode.FAILED_PRECONDITION,
        "num_classes",
    ),
    OpenCase(
        "world size disagrees",
        lambda m: _open(m, world_size=3),
        grpc.StatusCode.FAILED_PRECONDITION,
        "world_size",
    ),
    OpenCase("negative step", lambda m: _open(m, step=-1), grpc.StatusCode.INVALID_ARGUMENT, "step"),
    OpenCase(
        "unknown score kind", lambda m: _open(m, score_kind=7), grpc.StatusCode.INVALID_ARGUMENT, "score_kind"
    ),
    OpenCase(
        "unknown ack mode", lambda m: _open(m, ack_mode=7), grpc.StatusCode.INVALID_ARGUMENT, "ack_mode"
    ),
    OpenCase("non-UTF-8 run", _non_utf8, grpc.StatusCode.INVALID_ARGUMENT, "UTF-8"),
    OpenCase(
        "records layout version of another release",
        lambda m: _open(m, reduce=service_pb2.REDUCE_MODE_CLIENT, records_layout_version=LAYOUT_VERSION + 1),
        grpc.StatusCode.FAILED_PRECONDITION,
        f"layout version {LAYOUT_VERSION + 1}, this server reads layout version {LAYOUT_VERSION}",
    ),
    OpenCase("unknown reduce mode", lambda m: _open(m, reduce=9), grpc.StatusCode.INVALID_ARGUMENT, "reduce"),
    OpenCase(
        "unknown field in OpenShard",
        lambda m: _wrap(1, _open(m).open.SerializeToString() + UNKNOWN_FIELD),
        grpc.StatusCode.INVALID_ARGUMENT,
        "StreamEvaluationRequest.open field 100",
    ),
    *[
        OpenCase(
            f"bad {what} {name!r}",
            _named(what, name),
            grpc.StatusCode.INVALID_ARGUMENT,
            "not a valid name",
        )
        for what in ("run", "model", "split")
        for name in BAD_NAMES
        if not (what == "split" and name == "")  # an empty split means "validation"
    ],
]

__all__ = ["CHUNK_CASES", "OPEN_CASES", "RECORDS_CASES", "STREAM_CASES", "service_pb2"]
