"""The StreamEvaluation wire format, both directions, for the client and the server alike.

A chunk request is mostly two or three tensor payloads of about 1 MiB. protobuf copies a bytes field
each time a message is built, serialized or read, which for such payloads costs as much as
everything else at either end; so the client writes chunk requests by hand and the server reads
them by hand, and everything else goes through protobuf unchanged. The parts, one job each:

- ``contract.py``: field numbers read from the generated descriptors, and the constants both ends
  share (dtype codes, score kinds, the legacy acknowledgement metadata);
- ``host.py``: torch tensors and numpy arrays as the wire sees them, never importing torch;
- ``encode.py``: requests written by hand, byte for byte what protobuf writes, one copy;
- ``parse.py``: requests read by hand as views of the received bytes, protobuf for anything else.

Callers import from ``evalstream.wire`` itself; the names below are its interface.
"""

from __future__ import annotations

from evalstream.wire.contract import (
    ACKS_METADATA,
    CHUNK_LABELS,
    CHUNK_SAMPLE_IDS,
    CHUNK_SCORES,
    CHUNK_SEQUENCE,
    DT,
    DTYPE_CODES,
    HOST_DTYPES,
    INDEX_DTYPES,
    ITEMSIZE,
    LEN,
    MASK64,
    RECORDS_COLUMNS,
    RECORDS_LAYOUT_VERSION,
    RECORDS_ROWS,
    RECORDS_SEQUENCE,
    REQUEST_CHUNK,
    REQUEST_RECORDS,
    SCORE_DTYPES,
    SCORE_KIND_NAMES,
    SCORE_KINDS,
    TENSOR_DTYPE,
    TENSOR_RAW,
    TENSOR_SHAPE,
    VARINT,
    tag,
)
from evalstream.wire.encode import (
    Part,
    WireTensor,
    encode_chunk_request,
    encode_tensor,
    len_field,
    varint_field,
)
from evalstream.wire.host import (
    host_array,
    imported_torch,
    is_tensor,
)
from evalstream.wire.parse import (
    EMPTY_TENSOR,
    Buffer,
    Payload,
    RawChunk,
    RawRecords,
    RawTensor,
    parse_chunk_request,
    parse_payload,
    parse_stream_request,
    raw_chunk,
)

__all__ = [
    "ACKS_METADATA",
    "CHUNK_LABELS",
    "CHUNK_SAMPLE_IDS",
    "CHUNK_SCORES",
    "CHUNK_SEQUENCE",
    "DT",
    "DTYPE_CODES",
    "EMPTY_TENSOR",
    "HOST_DTYPES",
    "INDEX_DTYPES",
    "ITEMSIZE",
    "LEN",
    "MASK64",
    "RECORDS_COLUMNS",
    "RECORDS_LAYOUT_VERSION",
    "RECORDS_ROWS",
    "RECORDS_SEQUENCE",
    "REQUEST_CHUNK",
    "REQUEST_RECORDS",
    "SCORE_DTYPES",
    "SCORE_KINDS",
    "SCORE_KIND_NAMES",
    "TENSOR_DTYPE",
    "TENSOR_RAW",
    "TENSOR_SHAPE",
    "VARINT",
    "Buffer",
    "Part",
    "Payload",
    "RawChunk",
    "RawRecords",
    "RawTensor",
    "WireTensor",
    "encode_chunk_request",
    "encode_tensor",
    "host_array",
    "imported_torch",
    "is_tensor",
    "len_field",
    "parse_chunk_request",
    "parse_payload",
    "parse_stream_request",
    "raw_chunk",
    "tag",
    "varint_field",
]
