"""Property tests: generated requests against the decoder's contract, the name rules and the server.

- ``decode_chunk`` on arbitrary tensors (any dtype code, shape, byte length) either returns views
  whose shapes and bytes are what an independent oracle expects, or raises ``ChunkError`` with a
  known reason, never anything else.
- A name is accepted exactly when it is safe as a Prometheus label value and a file name.
- Streams of generated chunks (valid, or spoiled one way at random) into the real server: each is
  committed (samples grow by its rows) exactly when the oracle says it is valid, else refused in-band
  with a known reason and nothing changes; the final result is the engine's on the accepted chunks.
"""

from __future__ import annotations

import itertools
import math
import string
from pathlib import Path

import grpc
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evalstream.service.convert import result_from_report
from evalstream.service.decode import decode_chunk
from evalstream.service.engine import ChunkError, Records
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer
from evalstream.service.errors import InvalidArgument
from evalstream.service.ingest import validate_name
from evalstream.service.server import BackgroundServer
from evalstream.service.settings import Settings
from evalstream.v1 import service_pb2, tensor_pb2
from evalstream.wire import ITEMSIZE
from tests.robustness.conftest import MAX_CHUNK_ROWS, NUM_CLASSES
from tests.robustness.rawstream import get_evaluation
from tests.support.lockstep import LockStep, chunk_request, close_request, open_request

DT = tensor_pb2.DataType
SCORE: set[int] = {DT.DATA_TYPE_FLOAT32, DT.DATA_TYPE_FLOAT16, DT.DATA_TYPE_BFLOAT16}
INDEX: set[int] = {DT.DATA_TYPE_INT32, DT.DATA_TYPE_INT64}
DECODE_REASONS = {
    "dtype_unspecified",
    "bad_dtype",
    "bad_shape",
    "byte_length_mismatch",
    "chunk_too_large",
    "shape_mismatch",
    "label_count_mismatch",
}
ENGINE_REASONS = {"label_out_of_range", "non_finite", "sample_id_negative"}

dtype_codes = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 99])
dims = st.one_of(st.integers(0, 6), st.integers(-3, -1), st.integers(1 << 30, 1 << 62))


@st.composite
def tensors(draw: st.DrawFn, ndim: st.SearchStrategy[int]) -> tensor_pb2.Tensor:
    code = draw(dtype_codes)
    n = draw(ndim)
    shape = draw(st.lists(dims, min_size=n, max_size=n))
    size = (
        math.prod(shape) * ITEMSIZE.get(code, 4)
        if all(0 <= d <= 6 for d in shape)
        else draw(st.integers(0, 64))
    )
    length = max(0, size + draw(st.sampled_from([0, 0, 0, -1, 1, -2])))
    return tensor_pb2.Tensor(dtype=code, shape=shape, raw_contents=bytes(length))  # type: ignore[arg-type]


def _oracle(chunk: service_pb2.Chunk) -> bool:
    """Does the decoder accept this chunk? Written from the protocol, not from evalstream/wire."""

    def ok(t: tensor_pb2.Tensor, allowed: set[int], ndim: int) -> bool:
        if t.dtype not in allowed or len(t.shape) != ndim or any(d < 0 for d in t.shape):
            return False
        return len(t.raw_contents) == math.prod(t.shape) * ITEMSIZE[t.dtype]

    s, y = chunk.scores, chunk.labels
    if not ok(s, SCORE, 2) or s.shape[0] > MAX_CHUNK_ROWS or s.shape[1] != NUM_CLASSES:
        return False
    if not ok(y, INDEX, 1) or y.shape[0] != s.shape[0]:
        return False
    if chunk.HasField("sample_ids"):
        return ok(chunk.sample_ids, INDEX, 1) and chunk.sample_ids.shape[0] == s.shape[0]
    return True


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    scores=tensors(st.sampled_from([2, 2, 2, 1, 3])),
    labels=tensors(st.sampled_from([1, 1, 1, 0, 2])),
    ids=st.none() | tensors(st.just(1)),
    classes_right=st.booleans(),
)
def test_decoder_accepts_exactly_what_the_protocol_allows(
    scores: tensor_pb2.Tensor, labels: tensor_pb2.Tensor, ids: tensor_pb2.Tensor | None, classes_right: bool
) -> None:
    if classes_right and len(scores.shape) == 2 and 0 <= scores.shape[0] <= 6:
        scores.shape[1] = NUM_CLASSES
        scores.raw_contents = bytes(scores.shape[0] * NUM_CLASSES * ITEMSIZE.get(scores.dtype, 4))
    chunk = service_pb2.Chunk(sequence=0, scores=scores, labels=labels)
    if ids is not None:
        chunk.sample_ids.CopyFrom(ids)
    expected = _oracle(chunk)
    try:
        decoded = decode_chunk(chunk, NUM_CLASSES, MAX_CHUNK_ROWS)
    except ChunkError as exc:
        assert not expected, f"valid chunk refused: {exc.reason}: {exc.message}"
        assert exc.reason in DECODE_REASONS and exc.message
        return
    assert expected, "invalid chunk accepted"
    assert tuple(decoded.scores.shape) == tuple(scores.shape)
    assert tuple(decoded.labels.shape) == tuple(labels.shape)


SAFE = set(string.ascii_letters + string.digits + "._:+=@-")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=140) | st.text(alphabet=[*sorted(SAFE), "/", " ", "\n", '"', "é"], max_size=140))
def test_names_are_accepted_exactly_when_safe_as_label_values_and_file_names(name: str) -> None:
    safe = (
        0 < len(name) <= 128
        and set(name) <= SAFE
        and name[0] not in ".-_:+=@"  # no hidden files, no option-like names, never "." or ".."
    )
    try:
        validate_name("model", name)
    except InvalidArgument as exc:
        assert not safe, f"safe name {name!r} refused"
        assert "not a valid name" in exc.message
        return
    assert safe, f"unsafe name {name!r} accepted"
    assert name not in (".", "..") and "/" not in name and "\0" not in name
    assert len(name.encode()) <= 255  # a file name on every common file system


def test_accepted_names_work_as_file_names(tmp_path: Path) -> None:
    for name in ["a", "A-1.2_b:c+d=e@f", "9" * 128, "run.2024-01-01T00:00"]:
        validate_name("run", name)
        (tmp_path / name).write_text("x")
        assert (tmp_path / name).read_text() == "x"


SPOILERS = [
    "none",
    "none",
    "none",
    "nan",
    "label_high",
    "label_negative",
    "short_bytes",
    "wrong_classes",
    "too_many_rows",
    "negative_id",
    "bad_dtype",
]


@st.composite
def chunk_specs(draw: st.DrawFn) -> tuple[int, int, str, str]:
    return (
        draw(st.integers(0, 12)),  # rows
        draw(st.integers(0, 2**31 - 1)),  # data seed
        draw(st.sampled_from(["float32", "float16", "int32labels"])),
        draw(st.sampled_from(SPOILERS)),
    )


def _build(
    seq: int, spec: tuple[int, int, str, str], id_base: int
) -> tuple[service_pb2.StreamEvaluationRequest, bool]:
    rows, seed, kind, spoil = spec
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(rows, NUM_CLASSES)).astype(np.float16 if kind == "float16" else np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=rows).astype(np.int32 if kind == "int32labels" else np.int64)
    ids = np.arange(id_base, id_base + rows, dtype=np.int64)
    valid = True
    if spoil == "nan" and rows:
        scores[rng.integers(rows), rng.integers(NUM_CLASSES)] = np.nan
        valid = False
    elif spoil == "label_high" and rows:
        labels[rng.integers(rows)] = NUM_CLASSES + int(rng.integers(0, 1000))
        valid = False
    elif spoil == "label_negative" and rows:
        labels[rng.integers(rows)] = -1
        valid = False
    elif spoil == "negative_id" and rows:
        ids[rng.integers(rows)] = -5
        valid = False
    request = chunk_request(seq, scores, labels, ids)
    if spoil == "short_bytes":
        request.chunk.scores.raw_contents = request.chunk.scores.raw_contents + b"\0"
        valid = False
    elif spoil == "wrong_classes":
        request = chunk_request(seq, np.zeros((rows, NUM_CLASSES + 1), np.float32), labels, ids)
        valid = False
    elif spoil == "too_many_rows":
        n = MAX_CHUNK_ROWS + 1
        request = chunk_request(seq, np.zeros((n, NUM_CLASSES), np.float32), np.zeros(n, np.int64))
        valid = False
    elif spoil == "bad_dtype":
        request.chunk.scores.dtype = DT.DATA_TYPE_INT64 if rows % 2 else 42  # type: ignore[assignment]
        valid = False
    return request, valid


_models = itertools.count()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(chunk_specs(), min_size=1, max_size=5))
def test_generated_streams_commit_exactly_the_valid_chunks(
    server: BackgroundServer, settings: Settings, specs: list[tuple[int, int, str, str]]
) -> None:
    model = f"prop-{next(_models)}"
    accepted: list[service_pb2.Chunk] = []
    samples = 0
    with grpc.insecure_channel(server.target) as channel:
        s = LockStep(channel)
        s.send(open_request(model, NUM_CLASSES))
        for seq, spec in enumerate(specs):
            request, valid = _build(seq, spec, id_base=1000 * seq)
            ack = s.send(request).ack
            assert ack.next_sequence == seq + 1
            if valid:
                assert not ack.HasField("rejection"), ack.rejection
                samples += spec[0]
                accepted.append(request.chunk)
            else:
                assert ack.rejection.reason in DECODE_REASONS | ENGINE_REASONS, ack.rejection
                assert ack.rejection.message
            assert ack.samples_committed == samples
        if samples == 0:
            s.end()
            return
        assert s.send(close_request(len(specs))).closed.samples == samples
        s.end()
        got = get_evaluation(channel, model).result
    config = settings.engine_config()
    reducer = ChunkReducer(NUM_CLASSES, config)
    parts = []
    for c in accepted:
        d = decode_chunk(c, NUM_CLASSES, MAX_CHUNK_ROWS)
        parts.append(reducer.reduce(d.scores, d.labels, d.sample_ids))
    want = result_from_report(compute_metrics(Records.concat(parts), NUM_CLASSES, config))
    assert got == want
