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

__all__ = ["CHUNK_CASES", "OPEN_CASES", "STREAM_CASES", "service_pb2"]
