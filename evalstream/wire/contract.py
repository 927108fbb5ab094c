"""The numbers and constants both ends of the wire share, read from the generated descriptors.

Every field number and wire type comes from ``proto/evalstream/v1`` through its generated
descriptors, never from a literal: a renumbered field flows through, and a field whose type or
cardinality changed stops the import (``_field``), since the hand-written reader and writer
(``parse.py``, ``encode.py``) know one wire form per field. tests/service/test_wire_contract.py checks
both directions against protobuf under a renumbered contract.

Constants both ends share are defined only here: dtype codes and their numpy forms, score kinds,
the legacy acknowledgement metadata.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from evalstream.v1 import evaluation_pb2, service_pb2, tensor_pb2

DT = tensor_pb2.DataType

# -- the contract's numbers, read from the generated descriptors -------------------------------------

VARINT, LEN = 0, 2  # the two wire types used here
MASK64 = (1 << 64) - 1
_T = FieldDescriptor


def _field(message: type[Message], name: str, kind: int, *, repeated: bool = False) -> int:
    """The number of ``message.name``; at import, an error if the contract changed its type.

    This module reads and writes each field in one wire form; a field whose type or cardinality
    changed in the .proto would silently be read wrong, so it stops the import instead.
    """
    fd = message.DESCRIPTOR.fields_by_name[name]
    if fd.type != kind or fd.is_repeated != repeated:
        where = f"{message.DESCRIPTOR.full_name}.{name}"
        raise ImportError(f"{where} changed its type or cardinality; evalstream/wire must follow")
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


def tag(number: int, wire_type: int) -> int:
    """A field's key as a number: its field number and wire type."""
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
