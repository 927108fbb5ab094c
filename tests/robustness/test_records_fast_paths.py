"""The records ingest's fast paths, each pinned to its plain reference.

- ``records_wire.check`` (column extremes, a few vectorized passes) against ``check_reference``
  (one element-wise pass per rule): the same verdict and, on a refusal, the same reason and
  message, for engine records spoiled anywhere and in any number of places, and for tie-heavy
  records (where the fast check must defer to the reference).
- ``wire.parse_stream_request``'s RecordsChunk reader against protobuf: every plain request is
  read as protobuf reads it; anything protobuf would read differently (a field twice, an unknown
  field, a layout version past 32 bits) is left to protobuf.
- ``records_wire.receive``'s blob (the received columns behind a head) against
  ``Records.to_bytes``: byte for byte.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from evalstream import wire
from evalstream.service.engine import ChunkError, EngineConfig, Records
from evalstream.service.engine.reducer import ChunkReducer
from evalstream.service.records_wire import (
    LAYOUT_VERSION,
    check,
    check_reference,
    encode_request,
    layout_for,
    receive,
)
from evalstream.v1 import service_pb2

NUM_CLASSES = 7
CONFIG = EngineConfig(device="cpu", backend="eager")
LAYOUT = layout_for(CONFIG.inverse_temperatures, CONFIG.max_rank)
REDUCER = ChunkReducer(NUM_CLASSES, CONFIG)
FLOATS = [float("nan"), float("inf"), -float("inf"), -1.0, -1e-4, -1.00001e-4, -1e-7, 0.0, 0.5, 1.0]
FLOATS += [2.0, 2.0002, 2.00021, 1 / NUM_CLASSES, (1 / NUM_CLASSES) * (1 - 1e-4), np.log(NUM_CLASSES), 1e9]
INTS = [-(1 << 31), -2, -1, 0, 1, 2, NUM_CLASSES - 2, NUM_CLASSES - 1, NUM_CLASSES, 1 << 15]


def _engine_records(seed: int, rows: int, with_ids: bool, scale: float) -> Records:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, rows)
    scores = rng.standard_normal((rows, NUM_CLASSES)) * scale
    if scale >= 1.0:  # quantised scores: ties between classes, some with the label or the maximum
        scores = np.round(scores)
    ids = np.arange(rows, dtype=np.int64) if with_ids else None
    return REDUCER.reduce(scores.astype(np.float32), labels, ids)


def _verdict(fn: Any, arrays: dict[str, np.ndarray]) -> tuple[str, str] | None:
    try:
        fn(arrays, NUM_CLASSES, CONFIG.max_rank)
    except ChunkError as exc:
        return exc.reason, exc.message
    return None


spoil = st.tuples(
    st.sampled_from([c.name for c in LAYOUT.columns]),
    st.integers(0, 11),
    st.sampled_from(FLOATS),
    st.sampled_from(INTS),
    st.integers(0, 3),  # which grid point of a 2-D column
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 10_000),
    rows=st.integers(0, 12),
    with_ids=st.booleans(),
    scale=st.sampled_from([0.0, 0.5, 1.0, 3.0, 30.0]),
    spoils=st.lists(spoil, max_size=4),
)
def test_the_fast_check_answers_as_the_reference_does(
    seed: int, rows: int, with_ids: bool, scale: float, spoils: list[tuple[str, int, float, int, int]]
) -> None:
    rec = _engine_records(seed, rows, with_ids, scale)
    arrays = {c.name: np.array(getattr(rec, c.name)) for c in LAYOUT.columns}
    for name, row, value, int_value, col in spoils:
        if row >= rows:
            continue
        arr = arrays[name]
        new = value if arr.dtype.kind == "f" else np.array(int_value).astype(arr.dtype)
        if arr.ndim == 1:
            arr[row] = new
        else:
            arr[row, col % arr.shape[1]] = new
    assert _verdict(check, arrays) == _verdict(check_reference, arrays)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", [c.name for c in LAYOUT.columns if c.dtype.kind == "f"])
def test_one_non_finite_value_is_judged_as_the_reference_does(name: str, value: float) -> None:
    """Every float column, every non-finite value, in one record of several untied ones (where the
    fast check decides alone). A column whose lower bound is -inf (log_rest, rest_slope) once let
    -inf through: the column's minimum was compared with the bound but not checked for finiteness."""
    rec = _engine_records(3, 6, True, 0.5)  # scale < 1: no ties, so the fast check decides alone
    arrays = {c.name: np.array(getattr(rec, c.name)) for c in LAYOUT.columns}
    assert (arrays["ties"] == 0).all()
    arrays[name][2] = value
    assert _verdict(check, arrays) == _verdict(check_reference, arrays)
    assert _verdict(check, arrays) is not None


def test_the_fast_check_defers_tied_records_to_the_reference() -> None:
    """Constant rows: rank 0, every other class tied, pred 0 below most labels. Valid, and outside
    what the extremes alone can accept; a pred above such a label is refused as the reference does."""
    labels = np.arange(10) % NUM_CLASSES
    rec = REDUCER.reduce(np.zeros((10, NUM_CLASSES), np.float32), labels, np.arange(10))
    arrays = {c.name: np.array(getattr(rec, c.name)) for c in LAYOUT.columns}
    assert int(arrays["ties"].max()) == NUM_CLASSES - 1 and _verdict(check, arrays) is None
    arrays["pred"][3] = 4  # label 3 ties the maximum: pred must be <= 3
    assert _verdict(check, arrays) == _verdict(check_reference, arrays) is not None


def test_a_column_the_fast_check_does_not_know_goes_to_the_reference() -> None:
    """A layout that gains a column keeps its checks: ``check`` asks the reference about it."""
    rec = _engine_records(1, 5, True, 1.0)
    arrays: dict[str, np.ndarray] = {c.name: np.array(getattr(rec, c.name)) for c in LAYOUT.columns}
    arrays["future"] = np.full(5, np.nan, dtype=np.float32)
    assert (
        _verdict(check, arrays)
        == _verdict(check_reference, arrays)
        == (
            "non_finite",
            "records: future[0] = nan is not finite (first offending record: 0)",
        )
    )


# -- the wire reader ---------------------------------------------------------------------------------

UINT64 = st.integers(0, (1 << 64) - 1)


@settings(max_examples=300, deadline=None)
@given(
    sequence=UINT64 | st.integers(0, 100),
    version=st.integers(0, (1 << 32) - 1) | st.sampled_from([0, LAYOUT_VERSION]),
    rows=UINT64 | st.integers(0, 100),
    columns=st.binary(max_size=300),
    extra=st.sampled_from([b"", "repeat", "unknown", "wide_version", "empty"]),
)
def test_plain_records_are_read_as_protobuf_reads_them(
    sequence: int, version: int, rows: int, columns: bytes, extra: object
) -> None:
    msg = service_pb2.RecordsChunk(sequence=sequence, layout_version=version, rows=rows, columns=columns)
    body = msg.SerializeToString()
    if extra == "repeat":  # a field twice: protobuf keeps the last
        body += wire.varint_field(1, 7) + wire.varint_field(1, 8)
    elif extra == "unknown":
        body += wire.varint_field(9, 1)
    elif extra == "wide_version":  # a uint32 sent as a 64-bit varint: protobuf keeps the low bits
        body += wire.varint_field(2, version | (1 << 40))
    elif extra == "empty":
        body = b""
    data = wire.len_field(4, len(body)) + body
    parsed = wire.parse_stream_request(data)
    expected = service_pb2.StreamEvaluationRequest.FromString(data)
    if isinstance(parsed, wire.RawRecords):
        assert extra in (b"", "empty")
        r = expected.records
        assert (parsed.sequence, parsed.layout_version, parsed.rows, bytes(parsed.columns)) == (
            r.sequence,
            r.layout_version,
            r.rows,
            r.columns,
        )
    else:
        assert extra not in (b"", "empty"), "a plain RecordsChunk was left to protobuf"
        assert parsed == expected


def test_the_encoders_requests_are_read_without_protobuf_and_keep_the_columns_in_place() -> None:
    rec = _engine_records(3, 9, True, 1.0)
    data = encode_request(rec, LAYOUT, 2, 9, 17)
    parsed = wire.parse_stream_request(data)
    assert isinstance(parsed, wire.RawRecords)
    assert (parsed.sequence, parsed.layout_version, parsed.rows) == (17, LAYOUT_VERSION, 7)
    assert isinstance(parsed.columns, memoryview) and parsed.columns.obj is data  # a view, no copy


# -- the stored blob ---------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 1000), rows=st.integers(0, 20), with_ids=st.booleans())
def test_the_blob_made_from_received_columns_is_the_records_to_bytes(
    seed: int, rows: int, with_ids: bool
) -> None:
    rec = _engine_records(seed, rows, with_ids, 1.0)
    parsed = wire.parse_stream_request(encode_request(rec, LAYOUT, 0, rows, 0))
    assert isinstance(parsed, wire.RawRecords)
    received = receive(parsed, LAYOUT, NUM_CLASSES, 64)
    assert received.blob == received.records.to_bytes() == rec.to_bytes()
    back = Records.from_bytes(received.blob)
    for c in LAYOUT.columns:
        assert np.array_equal(getattr(back, c.name), getattr(rec, c.name))
