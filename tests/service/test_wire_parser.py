"""The StreamEvaluation request parser: it must read exactly what protobuf reads, or hand over to it.

``wire.parse_chunk_request`` reads plain chunk requests straight from the received bytes. The
property that makes it safe: whenever it returns a chunk, protobuf parses the same bytes into a
request carrying that chunk (same sequence, dtypes, shapes, payload bytes, sample ids present or
not) with no unknown fields; whenever protobuf would refuse the bytes, or find a field this server
does not know, the parser returns None and protobuf decides, as before.
"""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evalstream import wire
from evalstream.service.decode import decode_chunk, decode_raw
from evalstream.service.engine import ChunkError
from evalstream.service.streaming import unknown_fields
from evalstream.v1 import service_pb2, tensor_pb2

R = service_pb2.StreamEvaluationRequest
INT64 = st.integers(-(1 << 63), (1 << 63) - 1)

tensors = st.builds(
    lambda dtype, shape, raw: tensor_pb2.Tensor(dtype=dtype, shape=shape, raw_contents=raw),  # type: ignore[arg-type]
    st.integers(0, 7) | st.integers(0, (1 << 31) - 1),
    st.lists(st.integers(-3, 40) | INT64, max_size=3),
    st.binary(max_size=64),
)


@st.composite
def chunk_requests(draw: st.DrawFn) -> R:
    chunk = service_pb2.Chunk(sequence=draw(st.integers(0, (1 << 64) - 1)))
    for name in ("scores", "labels", "sample_ids"):
        if draw(st.booleans()):
            getattr(chunk, name).CopyFrom(draw(tensors))
    return R(chunk=chunk)


def _protobuf_view(data: bytes) -> wire.RawChunk | None:
    """What the protobuf path makes of ``data``: its chunk, or None if refused or not a plain chunk."""
    try:
        request = R.FromString(data)
    except DecodeError:
        return None
    if request.WhichOneof("message") != "chunk" or unknown_fields(request):
        return None
    return wire.raw_chunk(request.chunk)


def _same(a: wire.RawChunk, b: wire.RawChunk) -> bool:
    def t(x: wire.RawTensor | None) -> tuple[int, tuple[int, ...], bytes] | None:
        return None if x is None else (x.dtype, tuple(x.shape), bytes(x.raw))

    return (a.sequence, t(a.scores), t(a.labels), t(a.sample_ids)) == (
        b.sequence,
        t(b.scores),
        t(b.labels),
        t(b.sample_ids),
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunk_requests())
def test_every_chunk_protobuf_writes_is_read_without_protobuf_and_alike(request: R) -> None:
    data = request.SerializeToString()
    parsed = wire.parse_chunk_request(data)
    assert parsed is not None, "protobuf's own encoding of a chunk is the plain form"
    expected = _protobuf_view(data)
    assert expected is not None and _same(parsed, expected)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(chunk_requests()).SerializeToString())
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "append"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete" and data:
            del data[at : at + draw(st.integers(1, 4))]
        elif op == "truncate":
            del data[at:]
        else:
            data += draw(st.binary(min_size=1, max_size=12))
    return bytes(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated() | st.binary(max_size=80))
def test_a_chunk_read_without_protobuf_is_exactly_what_protobuf_reads(data: bytes) -> None:
    parsed = wire.parse_chunk_request(data)
    if parsed is None:
        return  # protobuf decides, as it did before the parser existed
    expected = _protobuf_view(data)
    assert expected is not None, "the parser accepted bytes protobuf refuses or finds unknown fields in"
    assert _same(parsed, expected)


def _tensor_bytes(fields: bytes) -> bytes:
    return b"\x12" + bytes([len(fields)]) + fields


def test_unusual_encodings_go_to_protobuf() -> None:
    scores = b"\x08\x01\x12\x02\x01\x02\x1a\x08" + bytes(8)  # FLOAT32 [1, 2], 8 bytes
    plain = _tensor_bytes(b"\x08\x05" + b"\x12" + bytes([len(scores)]) + scores)
    parsed = wire.parse_chunk_request(plain)
    assert parsed is not None and parsed.sequence == 5 and parsed.scores.shape == (1, 2)
    assert parsed.labels == wire.EMPTY_TENSOR and parsed.sample_ids is None
    cases = {
        "unknown chunk field": b"\x08\x05\x28\x01",
        "unknown tensor field": b"\x12\x04\x08\x01\x20\x01",
        "repeated sequence": b"\x08\x05\x08\x06",
        "repeated tensor": b"\x12\x02\x08\x01\x12\x02\x08\x02",
        "unpacked shape": b"\x12\x04\x08\x01\x10\x03",
        "sequence as bytes": b"\x0a\x01\x00",
        "length past the end": b"\x12\x09\x08\x01",
        "negative dtype": b"\x12\x0b\x08" + b"\xff" * 9 + b"\x01",
        "varint over 64 bits": b"\x08" + b"\xff" * 9 + b"\x7f",
    }
    for what, fields in cases.items():
        assert wire.parse_chunk_request(_tensor_bytes(fields)) is None, what
    # Anything but a lone chunk field at the top: open, close, a chunk then trailing bytes.
    opened = R(open=service_pb2.OpenShard(num_classes=3)).SerializeToString()
    closed = R(close=service_pb2.CloseShard(num_chunks=2)).SerializeToString()
    for data in (opened, closed, plain + b"\x1a\x00", b"", b"\x12"):
        assert wire.parse_chunk_request(data) is None
    assert isinstance(wire.parse_stream_request(opened), R)
    assert isinstance(wire.parse_stream_request(plain), wire.RawChunk)
    with pytest.raises(DecodeError):
        wire.parse_stream_request(b"\x12\x09\x08\x01")  # truncated: protobuf's refusal, as before


def test_decoding_a_parsed_chunk_equals_decoding_protobufs() -> None:
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(5, 3)).astype(np.float32)
    chunk = service_pb2.Chunk(
        sequence=9,
        scores=wire.encode_tensor(scores),
        labels=wire.encode_tensor(np.array([0, 2, 1, 1, 0], np.int32)),
        sample_ids=wire.encode_tensor(np.arange(5, dtype=np.int32)),
    )
    data = R(chunk=chunk).SerializeToString()
    parsed = wire.parse_chunk_request(data)
    assert parsed is not None
    ours, theirs = decode_raw(parsed, 3, 100), decode_chunk(chunk, 3, 100)
    np.testing.assert_array_equal(ours.scores, theirs.scores)  # type: ignore[arg-type]
    np.testing.assert_array_equal(ours.labels, theirs.labels)
    assert ours.sample_ids is not None and ours.sample_ids.dtype == np.int64
    np.testing.assert_array_equal(ours.sample_ids, theirs.sample_ids)  # type: ignore[arg-type]
    assert ours.num_bytes == theirs.num_bytes == 60
    # The scores view the received bytes: no copy before the staging block.
    start = np.frombuffer(data, np.uint8).ctypes.data
    assert start < ours.host.ctypes.data < start + len(data) and not ours.host.flags.writeable
    for bad in (decode_raw, lambda c, n, m: decode_chunk(R.FromString(data).chunk, n, m)):
        with pytest.raises(ChunkError) as info:
            bad(parsed, 4, 100)
        assert info.value.reason == "shape_mismatch"
