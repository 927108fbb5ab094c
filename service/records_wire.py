"""Per-sample records on the wire: the layout, the encoder and the validating decoder.

A client that reduces its own scores (``REDUCE_MODE_CLIENT``) sends ``RecordsChunk`` messages:
the record columns of ``records.FIELDS`` in order, raw little-endian, concatenated without
padding; a column of ``width`` values per record (the temperature grid's length for
per-temperature columns) holds ``rows * width`` values. The layout (version, column list,
temperature grid, rank cap) is derived here from ``records.FIELDS``, ``records.VERSION`` and the
engine's grid, never written out by hand, so a change of the record layout flows through to the
wire, the open reply and the checks.

The server trusts nothing in a records message. ``decode_records`` checks the version and byte
length, then every value a real engine could never produce: labels and predictions outside
[0, C), a rank above C - 1 or inconsistent with the prediction (pred is the argmax: it differs
from the label when rank > 0, equals it when rank == 0 and nothing ties the label, and is at most
the label when the label ties the maximum), ties that with the rank count more than the C - 1
other classes, non-finite floats, NLLs below 0, Brier outside [0, 2], entropy outside [0, log C],
confidence outside [1/C, 1], a temperature model outside its range (log_rest above log C, a positive
rest_slope, a negative rest_curvature), negative sample ids.
Each refusal is a ``ChunkError`` naming the column and the first offending record, which the
servicer returns in-band (the stream survives and the evaluation is unchanged). Bounds carry
``TOLERANCE``: float32 rounding in the engine can put a value a few ulps past its mathematical bound.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from evalstream.service.engine.errors import ChunkError
from evalstream.service.engine.records import FIELDS, VERSION, Records, blob_head
from evalstream.v1 import service_pb2
from evalstream.wire import RawRecords, len_field, varint_field

# The records layout version this build reads and writes (the records' binary form version).
LAYOUT_VERSION = VERSION
# Slack on every bound, absolute for bounds at 0 and relative elsewhere: float32 rounding in the
# engine (softmax sums, log of a sum of powers) lands values up to ~1e-6 past their bounds.
TOLERANCE = 1e-4
# Request field number of RecordsChunk in StreamEvaluationRequest, and its own fields.
_REQUEST_FIELD = service_pb2.StreamEvaluationRequest.DESCRIPTOR.fields_by_name["records"].number
_RC = service_pb2.RecordsChunk.DESCRIPTOR.fields_by_name


@dataclass(frozen=True)
class Column:
    """One record column: its name in ``records.FIELDS``, little-endian dtype and per-record shape."""

    name: str
    dtype: np.dtype
    dims: tuple[int, ...]

    @property
    def width(self) -> int:
        return math.prod(self.dims)

    @property
    def nbytes(self) -> int:
        """Bytes of this column per record."""
        return self.width * self.dtype.itemsize


@dataclass(frozen=True)
class Layout:
    """Everything that shapes a record: what the server sends the client in its open reply."""

    version: int
    inverse_temperatures: tuple[float, ...]
    max_rank: int
    columns: tuple[Column, ...]

    @property
    def record_bytes(self) -> int:
        return sum(c.nbytes for c in self.columns)

    def signature(self) -> tuple[int, tuple[tuple[str, str, int], ...]]:
        """What two layouts must share for records to travel between them (the grid aside)."""
        return self.version, tuple((c.name, c.dtype.str, c.width) for c in self.columns)

    def max_rows(self, max_message_bytes: int) -> int:
        """Records one message may carry: what fits in a message, with room for the small fields."""
        return max(1, (max_message_bytes - 1024) // self.record_bytes)

    def to_pb(self, max_message_bytes: int) -> service_pb2.RecordsLayout:
        return service_pb2.RecordsLayout(
            version=self.version,
            inverse_temperatures=list(self.inverse_temperatures),
            max_rank=self.max_rank,
            columns=[
                service_pb2.RecordColumn(name=c.name, dtype=c.dtype.str, width=c.width) for c in self.columns
            ],
            record_bytes=self.record_bytes,
            max_rows=self.max_rows(max_message_bytes),
        )


def layout_for(inverse_temperatures: tuple[float, ...] | list[float], max_rank: int) -> Layout:
    """The layout this build's engine produces for a temperature grid and rank cap.

    Column shapes come from an empty ``Records`` on that grid, so a column with a grid axis (or
    any other) is sized by the records class itself.
    """
    grid = tuple(float(a) for a in inverse_temperatures)
    empty = Records.empty(grid)
    columns = tuple(
        Column(name, np.dtype(dtype), tuple(int(d) for d in getattr(empty, name).shape[1:]))
        for name, dtype in FIELDS.items()
    )
    return Layout(LAYOUT_VERSION, grid, int(max_rank), columns)


def layout_from_pb(msg: service_pb2.RecordsLayout) -> tuple[int, tuple[tuple[str, str, int], ...]]:
    """The signature of a layout a server sent (compared with ``Layout.signature``)."""
    return msg.version, tuple((c.name, c.dtype, c.width) for c in msg.columns)


# -- encoding ---------------------------------------------------------------------------------------


def encode_columns(records: Records, layout: Layout, start: int = 0, stop: int | None = None) -> list[bytes]:
    """Rows [start, stop) of ``records`` as the layout's raw little-endian columns, one buffer each."""
    stop = len(records) if stop is None else stop
    return [
        np.ascontiguousarray(getattr(records, c.name)[start:stop], dtype=c.dtype).tobytes()
        for c in layout.columns
    ]


def encode_request(records: Records, layout: Layout, start: int, stop: int, sequence: int) -> bytes:
    """The serialized StreamEvaluationRequest carrying rows [start, stop) as one RecordsChunk.

    Written by hand (a few tags and lengths around the column bytes, joined once) for the same
    reason as the chunk encoder: protobuf would copy the payload at every nesting level.
    """
    columns = encode_columns(records, layout, start, stop)
    return request_from_columns(columns, stop - start, layout.version, sequence)


def request_from_columns(columns: list[bytes], rows: int, version: int, sequence: int) -> bytes:
    """The serialized request around column buffers already in the layout's order and form."""
    size = sum(len(c) for c in columns)
    head = (
        varint_field(_RC["sequence"].number, sequence)
        + varint_field(_RC["layout_version"].number, version)
        + varint_field(_RC["rows"].number, rows)
        + (len_field(_RC["columns"].number, size) if size else b"")
    )
    return b"".join([len_field(_REQUEST_FIELD, len(head) + size), head, *columns])


# -- decoding and validation ------------------------------------------------------------------------


def _first(mask: npt.NDArray[np.bool_] | np.bool_) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if hits.size else None


def _row(arr: npt.NDArray[np.generic], i: int) -> str:
    """The offending value(s) of record i, for the message."""
    v = arr[i]
    return str(v.tolist()) if isinstance(v, np.ndarray) else str(v.item())


def _refuse(reason: str, column: str, arr: npt.NDArray[np.generic], i: int, why: str) -> ChunkError:
    return ChunkError(reason, f"records: {column}[{i}] = {_row(arr, i)} {why} (first offending record: {i})")


def decode_records(
    msg: service_pb2.RecordsChunk | RawRecords, layout: Layout, num_classes: int, max_rows: int
) -> Records:
    """The records of one message, as views over its bytes; ``ChunkError`` on anything invalid.

    ``msg`` is a ``RawRecords`` read off the wire (its columns a view of the received bytes), or a
    protobuf RecordsChunk for a request protobuf had to parse (same fields, same checks)."""
    if msg.layout_version != layout.version:
        raise ChunkError(
            "records_layout_version",
            f"records: layout version {msg.layout_version} is not this shard's layout version "
            f"{layout.version}; reopen the shard and reduce with the layout in its reply",
        )
    rows = int(msg.rows)
    if rows > max_rows:
        raise ChunkError(
            "chunk_too_large",
            f"records: {rows} records exceed the {max_rows} one message may carry; send smaller messages",
        )
    data = memoryview(msg.columns)
    expected = rows * layout.record_bytes
    if len(data) != expected:
        raise ChunkError(
            "byte_length_mismatch",
            f"records: {len(data)} bytes of columns but {rows} records of {layout.record_bytes} bytes "
            f"need {expected}; send the layout's columns in order, raw little-endian",
        )
    arrays: dict[str, npt.NDArray[Any]] = {}
    offset = 0
    for c in layout.columns:
        count = rows * c.width
        arrays[c.name] = np.frombuffer(data, dtype=c.dtype, count=count, offset=offset).reshape(rows, *c.dims)
        offset += count * c.dtype.itemsize
    check(arrays, num_classes, layout.max_rank)
    return Records(**arrays, inverse_temperatures=np.asarray(layout.inverse_temperatures, dtype=np.float64))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Received:
    """One validated message: its records (views over the received bytes) and the store's blob of
    them (``Records.to_bytes``'s form: the blob head and the columns exactly as received)."""

    records: Records
    blob: bytes


def receive(
    msg: service_pb2.RecordsChunk | RawRecords, layout: Layout, num_classes: int, max_rows: int
) -> Received:
    """``decode_records``, and the records blob made from the received column bytes.

    The wire's columns are the blob's arrays already (the layout is ``records.FIELDS`` in order,
    little-endian, unpadded), so the blob is its head and those bytes in one copy, where
    ``Records.to_bytes`` would copy every column and then join them."""
    records = decode_records(msg, layout, num_classes, max_rows)
    dims = {c.name: c.dims for c in layout.columns}
    head = blob_head(len(records), layout.inverse_temperatures, dims)
    return Received(records, b"".join((head, msg.columns)))


def check(arrays: dict[str, npt.NDArray[Any]], num_classes: int, max_rank: int) -> None:
    """``check_reference``'s verdict, mostly from one min/max per column.

    Records from a real engine pass every bound with room to spare, so the column extremes
    decide: each bound holds for every record iff it holds for the column's min and max (NaN
    propagates through both and fails every comparison). What extremes cannot decide alone (the
    pairwise rank/ties/pred rules, a message without ids) is a few element-wise passes, and
    anything that does not plainly pass goes to ``check_reference``, which finds the first
    offending record and words the refusal. So this function accepts exactly what the reference
    accepts and refuses with the same error (tests/robustness/test_records_fast_check.py); it
    costs ~10 vectorized reductions instead of ~40 element-wise passes with temporaries.
    """
    if _plainly_valid(arrays, num_classes, max_rank):
        return
    check_reference(arrays, num_classes, max_rank)


def _plainly_valid(arrays: dict[str, npt.NDArray[Any]], num_classes: int, max_rank: int) -> bool:
    """True only if every record passes ``check_reference`` (False says nothing: ask it)."""
    if not arrays or len(arrays["label"]) == 0:
        return True
    if not _KNOWN.issuperset(arrays):
        return False  # a column this function does not know the rules of: the reference decides
    c, label = num_classes, arrays["label"]
    ids = arrays["sample_id"]
    lo, hi = int(ids.min()), int(ids.max())
    if not (lo >= 0 or lo == hi == -1):
        return False
    pred, rank = arrays["pred"], arrays["rank"]
    if int(label.min()) < 0 or int(label.max()) >= c or int(pred.min()) < 0 or int(pred.max()) >= c:
        return False
    top_rank = int(rank.max())
    if top_rank > min(c - 1, max_rank):
        return False
    ties = arrays.get("ties")
    if ties is not None and int(ties.max()) + top_rank > c - 1:
        return False
    # rank 0 exactly where pred == label: the reference's rule when nothing ties (tied records,
    # where pred < label may also be right, are left to the reference).
    if not np.array_equal(pred == label, rank == 0):
        return False
    log_c = math.log(c)
    for name, (low, high) in _bounds(c, log_c).items():
        arr = arrays.get(name)
        if arr is None or arr.size == 0:
            continue
        mn, mx = float(arr.min()), float(arr.max())
        # Both ends finite too: log_rest's low bound is -inf, so -inf in one record beside finite
        # ones would pass the bounds alone (a non-finite value is refused whatever its column).
        if not (mn >= low and mx <= high and math.isfinite(mn) and math.isfinite(mx)):
            return False
    # Float columns without bounds still must be finite (NaN or an infinity makes min or max so).
    for name, arr in arrays.items():
        finite = arr.dtype.kind != "f" or name in _BOUNDED or arr.size == 0
        if not (finite or (math.isfinite(float(arr.min())) and math.isfinite(float(arr.max())))):
            return False
    return True


_BOUNDED = ("nll", "nll_t", "brier", "entropy", "confidence", "log_rest", "rest_slope", "rest_curvature")
# The columns whose rules ``_plainly_valid`` knows.
_KNOWN = frozenset(("sample_id", "label", "pred", "rank", "ties", *_BOUNDED))


def _limits(c: int, log_c: float) -> dict[str, tuple[float, float]]:
    """Each bounded column's mathematical [low, high]."""
    return {
        "nll": (0.0, math.inf),
        "nll_t": (0.0, math.inf),
        "brier": (0.0, 2.0),
        "entropy": (0.0, log_c),
        "confidence": (1.0 / c, 1.0),
        # L(b) sums C - 1 terms of at most 1; b L' is a mean of scores below the maximum; b^2 L'' a
        # variance (ABSENT, -1e30, is log_rest's value for C = 1).
        "log_rest": (-math.inf, log_c),
        "rest_slope": (-math.inf, 0.0),
        "rest_curvature": (0.0, math.inf),
    }


def _bounds(c: int, log_c: float) -> dict[str, tuple[float, float]]:
    """Each bounded column's accepted [low, high], tolerance included, exactly as the reference."""
    return {name: _tolerant(lo, hi) for name, (lo, hi) in _limits(c, log_c).items()}


def _tolerant(lo: float, hi: float) -> tuple[float, float]:
    low = lo * (1 - TOLERANCE) if lo > 0 else -math.inf if lo == -math.inf else -TOLERANCE
    return low, hi * (1 + TOLERANCE) if hi > 0 else hi + TOLERANCE


def check_reference(arrays: dict[str, npt.NDArray[Any]], num_classes: int, max_rank: int) -> None:
    """Every invariant a record from a real engine holds; ``ChunkError`` at the first that fails.

    The plain reference: each rule an element-wise pass, the first failing record located and
    named. ``check`` answers the same, faster, and asks this function whenever it is unsure."""
    if not arrays or len(arrays["label"]) == 0:
        return
    c = num_classes
    ids = arrays["sample_id"]
    i = _first(ids < -1)
    if i is None and bool(np.any(ids < 0)) and bool(np.any(ids >= 0)):
        i = _first(ids < 0)
    if i is not None:
        raise _refuse(
            "sample_id_negative",
            "sample_id",
            ids,
            i,
            "is negative (ids are >= 0 on every record, or -1 on every record of a message without ids)",
        )
    label, pred, rank = arrays["label"], arrays["pred"], arrays["rank"]
    for name, arr in (("label", label), ("pred", pred)):
        i = _first((arr < 0) | (arr >= c))
        if i is not None:
            reason = "label_out_of_range" if name == "label" else "pred_out_of_range"
            raise _refuse(reason, name, arr, i, f"is outside [0, {c})")
    i = _first(rank > min(c - 1, max_rank))
    if i is not None:
        raise _refuse(
            "rank_out_of_range", "rank", rank, i, f"exceeds min(C - 1, max_rank) = {min(c - 1, max_rank)}"
        )
    # pred is the argmax (the lowest index among the maxima), rank counts the classes strictly above
    # the label and ties (where the layout has it) the other classes equal to it.
    ties = arrays.get("ties")
    tied = np.zeros(len(label), dtype=bool) if ties is None else ties > 0
    if ties is not None:
        i = _first(ties.astype(np.int64) + rank.astype(np.int64) > c - 1)
        if i is not None:
            raise ChunkError(
                "ties_out_of_range",
                f"records: ties[{i}] = {int(ties[i])} with rank {int(rank[i])} counts more than the "
                f"C - 1 = {c - 1} other classes (first offending record: {i})",
            )
    top = rank == 0
    i = _first((~top & (pred == label)) | (top & ~tied & (pred != label)) | (top & tied & (pred > label)))
    if i is not None:
        t = "" if ties is None else f", ties {int(ties[i])}"
        raise ChunkError(
            "rank_inconsistent",
            f"records: record {i} has rank {int(rank[i])}{t}, pred {int(pred[i])} and label {int(label[i])}; "
            "pred is the argmax (the lowest index among the maxima): pred != label when rank > 0, "
            "pred == label when rank == 0 and nothing ties the label, pred <= label when the label "
            f"ties the maximum (first offending record: {i})",
        )
    for name, arr in arrays.items():
        if arr.dtype.kind != "f":
            continue
        bad = ~np.isfinite(arr)
        i = _first(bad if bad.ndim == 1 else bad.any(axis=1))
        if i is not None:
            raise _refuse("non_finite", name, arr, i, "is not finite")
    log_c = math.log(c)
    for name, (lo, hi) in _limits(c, log_c).items():
        if name not in arrays:
            continue
        arr = arrays[name]
        low, high = _tolerant(lo, hi)
        out: npt.NDArray[np.bool_] = (arr < low) | (arr > high)
        i = _first(out if out.ndim == 1 else out.any(axis=1))
        if i is not None:
            shown = f"[{lo:.6g}, {hi:.6g}]"
            raise _refuse("record_out_of_bounds", name, arr, i, f"is outside {shown}")
