"""Writing chunk requests by hand: a few tags and lengths joined with the arrays, one copy.

A chunk request is mostly two or three tensor payloads of about 1 MiB, and protobuf copies a bytes
field each time a message is built or serialized, which for such payloads costs as much as
everything else in the client. The bytes written here are protobuf's, byte for byte (fields in
protobuf's order, by number); tests/client/test_fast_encoding.py and test_wire_contract.py hold them
to it. Another payload kind is one more encoder built from ``_in_order``, ``_len_parts`` and
``_tensor_parts``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from evalstream.v1 import tensor_pb2
from evalstream.wire.contract import (
    CHUNK_LABELS,
    CHUNK_SAMPLE_IDS,
    CHUNK_SCORES,
    CHUNK_SEQUENCE,
    DTYPE_CODES,
    HOST_DTYPES,
    LEN,
    MASK64,
    REQUEST_CHUNK,
    TENSOR_DTYPE,
    TENSOR_RAW,
    TENSOR_SHAPE,
    VARINT,
    tag,
)
from evalstream.wire.host import host_array, is_tensor

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
    return _varint_bytes(tag(number, wire_type))


def len_field(number: int, payload_len: int) -> bytes:
    """Tag and length of a length-delimited field."""
    return _key(number, LEN) + _varint_bytes(payload_len)


def varint_field(number: int, value: int) -> bytes:
    """A varint field as protobuf writes it: nothing at all for proto3's default 0."""
    return _key(number, VARINT) + _varint_bytes(value) if value else b""


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
        dims = b"".join([_varint_bytes(int(d) & MASK64) for d in array.shape])
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
