"""Fuzz target (atheris/libFuzzer): bytes -> the server's request decoding path.

Every input goes through the server's request deserializer, ``wire.parse_stream_request``:
a plain chunk is read without protobuf (``wire.parse_chunk_request``), and then it must be
exactly what protobuf reads from the same bytes (same fields, no unknown ones), or the input is a
crash; plain records (``wire.RawRecords``) likewise, and their columns go through
``records_wire.receive``, whose blob must be the records' own ``to_bytes`` and whose verdict must
be the plain reference check's (``check_reference``). Anything else is parsed by protobuf,
checked for unknown fields as the servicer does, and then, by kind: an open's key goes through
the name and step validation; a chunk through ``decode.decode_raw`` and the engine's
``ChunkReducer``; a records chunk through ``records_wire.receive`` as above (every value check
of client-reduced records).
The only acceptable failures are the refusals the service turns into statuses
(``DecodeError``, ``ChunkError``, ``ServiceError``); anything else is a crash.

Run (what tests/robustness/test_fuzz.py does, bounded):
    python tests/robustness/fuzz_decoder.py -max_total_time=15 CORPUS_DIR
"""

from __future__ import annotations

import os
import sys
from typing import Any

import atheris

with atheris.instrument_imports(
    include=[
        "evalstream.wire",
        "evalstream.service.decode",
        "evalstream.service.engine.validate",
        "evalstream.service.records_wire",
    ]
):
    from google.protobuf.message import DecodeError

    from evalstream.service.decode import decode_chunk, decode_raw
    from evalstream.service.engine import ChunkError
    from evalstream.service.engine.reducer import ChunkReducer
    from evalstream.service.errors import ServiceError
    from evalstream.service.ingest import evaluation_key
    from evalstream.service.records_wire import check_reference, layout_for, receive
    from evalstream.service.settings import Settings
    from evalstream.service.streaming import unknown_fields
    from evalstream.v1 import service_pb2
    from evalstream.wire import RawChunk, RawRecords, parse_stream_request, raw_chunk

NUM_CLASSES = 4
MAX_ROWS = 64
# The suite's engine backend (eager unless EVALSTREAM_ENGINE_BACKEND names another), as the servers use.
BACKEND = os.environ.get("EVALSTREAM_ENGINE_BACKEND", "eager")
CONFIG = Settings.load(env={}, device="cpu", engine_backend=BACKEND).engine_config()
REDUCER = ChunkReducer(NUM_CLASSES, CONFIG)
LAYOUT = layout_for(CONFIG.inverse_temperatures, CONFIG.max_rank)


def _same_as_protobuf(data: bytes, parsed: RawChunk) -> None:
    """The parser's chunk must be what protobuf reads: a request whose only content is that chunk."""
    request = service_pb2.StreamEvaluationRequest.FromString(data)  # a DecodeError here is a crash
    if request.WhichOneof("message") != "chunk" or unknown_fields(request):
        raise AssertionError("the parser accepted a request protobuf reads differently")
    expected = raw_chunk(request.chunk)

    def t(x: object) -> object:
        return None if x is None else (x.dtype, tuple(x.shape), bytes(x.raw))  # type: ignore[attr-defined]

    got = (parsed.sequence, t(parsed.scores), t(parsed.labels), t(parsed.sample_ids))
    if got != (expected.sequence, t(expected.scores), t(expected.labels), t(expected.sample_ids)):
        raise AssertionError(f"parser and protobuf disagree: {got} != {expected}")


def _records_as_protobuf_reads_them(data: bytes, parsed: RawRecords) -> None:
    request = service_pb2.StreamEvaluationRequest.FromString(data)  # a DecodeError here is a crash
    if request.WhichOneof("message") != "records" or unknown_fields(request):
        raise AssertionError("the parser accepted a request protobuf reads differently")
    r = request.records
    got = (parsed.sequence, parsed.layout_version, parsed.rows, bytes(parsed.columns))
    if got != (r.sequence, r.layout_version, r.rows, r.columns):
        raise AssertionError(f"parser and protobuf disagree on a RecordsChunk: {got[:3]}")


def _records(msg: RawRecords | service_pb2.RecordsChunk) -> None:
    """``receive``'s fast paths against their references: the same verdict, the same blob."""
    try:
        received = receive(msg, LAYOUT, NUM_CLASSES, MAX_ROWS)
    except ChunkError as exc:
        try:
            records = decode_records_unchecked(msg)
        except ChunkError:
            raise exc from None
        try:
            check_reference(records, NUM_CLASSES, LAYOUT.max_rank)
        except ChunkError as ref:
            if (ref.reason, ref.message) != (exc.reason, exc.message):
                raise AssertionError(f"fast check and reference disagree: {exc} / {ref}") from None
            raise
        raise AssertionError(f"the fast check refused what the reference accepts: {exc}") from None
    if received.blob != received.records.to_bytes():
        raise AssertionError("the blob made from the received columns is not the records' to_bytes")


def decode_records_unchecked(msg: RawRecords | service_pb2.RecordsChunk) -> dict[str, Any]:
    """The columns of a message that passed the framing checks, without the value checks."""
    import numpy as np

    data = memoryview(msg.columns)
    rows, offset = int(msg.rows), 0
    arrays: dict[str, Any] = {}
    if msg.layout_version != LAYOUT.version or rows > MAX_ROWS or len(data) != rows * LAYOUT.record_bytes:
        raise ChunkError("framing", "refused before the value checks")
    for c in LAYOUT.columns:
        count = rows * c.width
        arrays[c.name] = np.frombuffer(data, dtype=c.dtype, count=count, offset=offset).reshape(rows, *c.dims)
        offset += count * c.dtype.itemsize
    return arrays


def one_input(data: bytes) -> None:
    try:
        request = parse_stream_request(data)
    except DecodeError:
        return
    try:
        if isinstance(request, RawChunk):
            _same_as_protobuf(data, request)
            chunk = decode_raw(request, NUM_CLASSES, MAX_ROWS)
            REDUCER.reduce(chunk.scores, chunk.labels, chunk.sample_ids)
            return
        if isinstance(request, RawRecords):
            _records_as_protobuf_reads_them(data, request)
            _records(request)
            return
        unknown_fields(request)
        kind = request.WhichOneof("message")
        if kind == "open":
            k = request.open.key
            evaluation_key(k.run, k.model, k.split, k.step)
        elif kind == "chunk":
            chunk = decode_chunk(request.chunk, NUM_CLASSES, MAX_ROWS)
            REDUCER.reduce(chunk.scores, chunk.labels, chunk.sample_ids)
        elif kind == "records":
            _records(request.records)
    except (ChunkError, ServiceError):
        return


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
