"""Fuzz target (atheris/libFuzzer): bytes -> the server's request decoding path.

Every input is parsed as a ``StreamEvaluationRequest`` exactly as gRPC does, checked for
unknown fields as the servicer does, and then, by kind: an open's key goes through the name
and step validation; a chunk through ``wire.decode_chunk`` and the engine's ``ChunkReducer``.
The only acceptable failures are the refusals the service turns into statuses
(``DecodeError``, ``ChunkError``, ``ServiceError``); anything else is a crash.

Run (what tests/robustness/test_fuzz.py does, bounded):
    python tests/robustness/fuzz_decoder.py -max_total_time=15 CORPUS_DIR
"""

from __future__ import annotations

import os
import sys

import atheris

with atheris.instrument_imports(include=["evalstream.service.wire", "evalstream.service.engine.validate"]):
    from google.protobuf.message import DecodeError

    from evalstream.service.engine import ChunkError
    from evalstream.service.engine.reducer import ChunkReducer
    from evalstream.service.errors import ServiceError
    from evalstream.service.ingest import evaluation_key
    from evalstream.service.servicer import unknown_fields
    from evalstream.service.settings import Settings
    from evalstream.service.wire import decode_chunk
    from evalstream.v1 import service_pb2

NUM_CLASSES = 4
MAX_ROWS = 64
# The suite's engine backend (eager unless EVALSTREAM_ENGINE_BACKEND names another), as the servers use.
BACKEND = os.environ.get("EVALSTREAM_ENGINE_BACKEND", "eager")
REDUCER = ChunkReducer(
    NUM_CLASSES, Settings.load(env={}, device="cpu", engine_backend=BACKEND).engine_config()
)


def one_input(data: bytes) -> None:
    try:
        request = service_pb2.StreamEvaluationRequest.FromString(data)
    except DecodeError:
        return
    unknown_fields(request)
    kind = request.WhichOneof("message")
    try:
        if kind == "open":
            k = request.open.key
            evaluation_key(k.run, k.model, k.split, k.step)
        elif kind == "chunk":
            chunk = decode_chunk(request.chunk, NUM_CLASSES, MAX_ROWS)
            REDUCER.reduce(chunk.scores, chunk.labels, chunk.sample_ids)
    except (ChunkError, ServiceError):
        return


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
