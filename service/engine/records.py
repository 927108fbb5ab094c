"""Per-sample records: the compact, mergeable source of truth of an evaluation.

A chunk of logits ([n, C] floats, 12 KB a sample at C=3,000) is reduced to one
record per sample (126 bytes at the default settings). Every metric is computed from records, so
records from any chunks and ranks merge by concatenation, paired comparisons
can line samples up by id, and the service checkpoints records instead of
logits.

Binary form (version 3), little-endian, no pickle::

    magic   b"EVREC"            5 bytes
    version uint8 = 3
    hlen    uint32              length of the JSON header
    header  JSON (utf-8)        {"n": int, "inverse_temperatures": [float...],
                                 "fields": [[name, dtype, [dims...]], ...]}
    arrays  raw bytes of each field in header order, C-contiguous

Readers check magic, version, and that the payload length matches the header.
Version 1 blobs (written before the ``ties`` column existed) still read: their ``ties``
column is all zeros, which is what they were computed as (the old rule credited every tie
to the label, i.e. treated the data as tie-free). Their ``pred`` is the label where the
label tied the maximum, so on such samples the binary views keep the old convention.

Versions 1 and 2 stored ``nll_t`` (each sample's NLL at the grid points) where version 3 stores
the temperature model's columns ``log_rest``, ``rest_slope`` and ``rest_curvature`` (curve.py). They
still read, as *legacy* records: ``legacy_nll_t`` holds their column, the model's are empty, and
the temperature scan falls back to the parabola through the grid minimum (temperature.py).
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

MAGIC = b"EVREC"
VERSION = 3
# Versions this build reads; a version-1 blob has no ``ties`` column (read as zeros, see above),
# versions 1 and 2 carry ``nll_t`` instead of the temperature model (legacy records).
READABLE_VERSIONS = (1, 2, 3)
LEGACY_VERSION = 2
NO_SAMPLE_ID = -1
# The temperature model's columns (curve.py), one value per grid point each.
MODEL_FIELDS = ("log_rest", "rest_slope", "rest_curvature")
# log_rest of a row with one class (no other class to sum over): exp(ABSENT) = 0, and the value is
# finite, so the wire's finiteness check holds.
ABSENT = np.float32(-1e30)
# rest_slope and rest_curvature are float16: dimensionless (b d/db and b^2 d^2/db^2 of log_rest),
# so their size is set by the logits' spread in units of T, and they are clipped to its range.
HALF_MAX = float(np.finfo(np.float16).max)

# name -> numpy dtype (little-endian). The model's columns have a second axis: the temperature grid.
FIELDS: dict[str, str] = {
    "sample_id": "<i8",
    "label": "<i4",
    "pred": "<i4",
    "rank": "<u2",
    "ties": "<u4",
    "nll": "<f4",
    "confidence": "<f4",
    "brier": "<f4",
    "entropy": "<f4",
    "log_rest": "<f4",
    "rest_slope": "<f2",
    "rest_curvature": "<f2",
}
# The per-temperature column of versions 1 and 2 (legacy records).
LEGACY_NLL_T = ("nll_t", "<f4")


def blob_head(n: int, inverse_temperatures: Iterable[float], dims: dict[str, tuple[int, ...]]) -> bytes:
    """The binary form up to its arrays, for n records with these per-record field shapes (what
    ``to_bytes`` writes before the columns; records received as raw columns in FIELDS order
    become a blob by adding only this)."""
    header = {
        "n": n,
        "inverse_temperatures": [float(a) for a in inverse_temperatures],
        "fields": [[name, FIELDS[name], [int(d) for d in dims[name]]] for name in FIELDS],
    }
    head = json.dumps(header, separators=(",", ":")).encode()
    return MAGIC + struct.pack("<BI", VERSION, len(head)) + head


@dataclass
class Records:
    """Column arrays of length n (the model's columns are [n, G]).

    ``sample_id``: -1 where the client sent no ids.
    ``label``, ``pred``: class indices; ``pred`` is ``argmax`` of the scores, the lowest
    index among the maxima (as ``torch.argmax`` / ``numpy.argmax``).
    ``rank``: number of classes with a strictly larger score than the label's,
    capped at the engine's ``max_rank``.
    ``ties``: number of *other* classes whose score equals the label's exactly (uint32:
    exact for any class count, since a constant-logit row at 131,072 classes has 131,071).
    ``nll``: logsumexp(z) - z_y. ``confidence``: max softmax probability.
    ``brier``: sum_c (p_c - y_c)^2. ``entropy``: -sum_c p_c log p_c.
    ``log_rest[:, j]``: L(b_j), L(b) = log sum over the classes other than ``pred`` of
    exp(b (z_c - max z)), b_j = inverse_temperatures[j] (``ABSENT`` where C = 1); ``rest_slope``:
    b L'(b) and ``rest_curvature``: b^2 L''(b) there (float16). With the margin max z - z_y =
    nll + log(confidence) they give the NLL at any temperature in the grid (curve.py).
    ``legacy_nll_t``: a version-1/2 blob's NLL at the grid points (then the model's columns have no
    values); None for records of this version.
    """

    sample_id: npt.NDArray[np.int64]
    label: npt.NDArray[np.int32]
    pred: npt.NDArray[np.int32]
    rank: npt.NDArray[np.uint16]
    ties: npt.NDArray[np.uint32]
    nll: npt.NDArray[np.float32]
    confidence: npt.NDArray[np.float32]
    brier: npt.NDArray[np.float32]
    entropy: npt.NDArray[np.float32]
    log_rest: npt.NDArray[np.float32]
    rest_slope: npt.NDArray[np.float16]
    rest_curvature: npt.NDArray[np.float16]
    inverse_temperatures: npt.NDArray[np.float64]
    legacy_nll_t: npt.NDArray[np.float32] | None = None

    def __post_init__(self) -> None:
        n = len(self.label)
        for name in FIELDS:
            arr = getattr(self, name)
            if arr.shape[0] != n:
                raise ValueError(f"records field {name} has {arr.shape[0]} rows, expected {n}")
        g = len(self.inverse_temperatures)
        width = 0 if self.legacy_nll_t is not None else g
        for name in MODEL_FIELDS:
            arr = getattr(self, name)
            if arr.ndim != 2 or arr.shape[1] != width:
                raise ValueError(f"{name} must be [n, {width}], got {list(arr.shape)}")
        legacy = self.legacy_nll_t
        if legacy is not None and (legacy.ndim != 2 or legacy.shape != (n, g)):
            raise ValueError(f"nll_t must be [n, {g}], got {list(legacy.shape)}")

    @property
    def legacy(self) -> bool:
        """Records of a version-1/2 blob: NLL at the grid points only, no temperature model."""
        return self.legacy_nll_t is not None

    @property
    def nll_t(self) -> npt.NDArray[np.float64]:
        """[n, G] NLL at each grid point: the stored column of legacy records, else the model's value
        there (curve.py; float64)."""
        if self.legacy_nll_t is not None:
            return self.legacy_nll_t.astype(np.float64)
        from evalstream.service.engine.curve import sample_nll

        return np.stack([sample_nll(self, float(b)) for b in self.inverse_temperatures], axis=1).reshape(
            len(self), len(self.inverse_temperatures)
        )

    def __len__(self) -> int:
        return len(self.label)

    @property
    def has_sample_ids(self) -> bool:
        return len(self) > 0 and bool(np.all(self.sample_id >= 0))

    @property
    def correct(self) -> npt.NDArray[np.bool_]:
        """The binary top-1 view: ``argmax == label`` (ties broken towards the lowest index).

        For metrics that need one predicted class (precision, F1, confusions, flips,
        McNemar). Accuracies use ``topk_credit``, its expectation under random tie-breaking."""
        return self.pred == self.label

    def topk_credit(self, k: int) -> npt.NDArray[np.float64]:
        """Each sample's expected top-k correctness under uniformly random tie-breaking.

        With ``g`` classes scoring strictly higher than the label and ``e`` others scoring
        exactly the same, a random order of the ``e + 1`` tied classes puts the label within
        the first ``k - g`` of them with probability ``clip((k - g) / (e + 1), 0, 1)``. It is
        0 or 1 on tie-free rows (today's value) and exactly ``k / C`` for a constant row, so a
        collapsed model scores chance, never 100%.
        """
        g = self.rank.astype(np.float64)
        e = self.ties.astype(np.float64)
        return np.clip((k - g) / (e + 1.0), 0.0, 1.0)

    @property
    def tied(self) -> npt.NDArray[np.bool_]:
        """Samples whose label's score equals another class's exactly."""
        return self.ties > 0

    @classmethod
    def empty(cls, inverse_temperatures: Sequence[float]) -> Records:
        g = len(inverse_temperatures)
        return cls(
            **{
                name: np.empty((0, g) if name in MODEL_FIELDS else 0, dtype=dt) for name, dt in FIELDS.items()
            },
            inverse_temperatures=np.asarray(inverse_temperatures, dtype=np.float64),
        )

    @classmethod
    def concat(cls, parts: Iterable[Records], inverse_temperatures: Sequence[float] | None = None) -> Records:
        """Merge records from any chunks and ranks (order does not change any metric)."""
        parts = list(parts)
        if not parts:
            if inverse_temperatures is None:
                raise ValueError("concat of no records needs the temperature grid")
            return cls.empty(inverse_temperatures)
        grid = parts[0].inverse_temperatures
        if any(p.legacy for p in parts) or any(
            not np.array_equal(p.inverse_temperatures, grid) for p in parts
        ):
            # An evaluation begun before version 3, or across a change of the grid (an upgrade, a new
            # setting): every part as the NLL at one grid, the first (a legacy part's if there are
            # any: those have nothing else) at which every part can be evaluated.
            candidates = [p.inverse_temperatures for p in parts if p.legacy] or [
                p.inverse_temperatures for p in parts
            ]
            grid = next((g for g in candidates if all(p.evaluable_at(g) for p in parts)), candidates[0])
            parts = [p.as_legacy(grid) for p in parts]
            legacy: npt.NDArray[np.float32] | None = np.concatenate([p.nll_t for p in parts]).astype(
                np.float32
            )
        else:
            legacy = None
        return cls(
            **{name: np.concatenate([getattr(p, name) for p in parts]) for name in FIELDS},
            inverse_temperatures=grid,
            legacy_nll_t=legacy,
        )

    def as_legacy(self, grid: npt.NDArray[np.float64] | None = None) -> Records:
        """These records as the NLL at the points of ``grid`` (their own by default), for a merge with
        legacy records or records of another grid. Records with the model are evaluated at any point
        within their grid's range; legacy records only at their own points."""
        grid = self.inverse_temperatures if grid is None else np.asarray(grid, dtype=np.float64)
        if self.legacy and np.array_equal(grid, self.inverse_temperatures):
            return self
        if not self.evaluable_at(grid):
            raise ValueError(
                "cannot merge records computed on different temperature grids: records of grid "
                f"{self.inverse_temperatures.tolist()} cannot be evaluated at {grid.tolist()}"
            )
        from evalstream.service.engine.curve import Curve

        model = Curve(self)
        nll_t = np.stack([model.sample(float(b)) for b in grid], axis=1).reshape(len(self), len(grid))
        return dataclasses.replace(
            self,
            **{name: np.empty((len(self), 0), FIELDS[name]) for name in MODEL_FIELDS},
            inverse_temperatures=grid,
            legacy_nll_t=nll_t.astype(np.float32),
        )

    def evaluable_at(self, grid: npt.NDArray[np.float64]) -> bool:
        """Whether the NLL at every point of ``grid`` is known: a legacy part's own points only, the
        model anywhere within its grid's range."""
        own = self.inverse_temperatures
        if self.legacy or len(own) == 0:
            return np.array_equal(grid, own)
        return len(grid) == 0 or (grid[0] >= own[0] * (1 - 1e-12) and grid[-1] <= own[-1] * (1 + 1e-12))

    def take(self, index: npt.NDArray[np.integer] | npt.NDArray[np.bool_] | slice) -> Records:
        return Records(
            **{name: getattr(self, name)[index] for name in FIELDS},
            inverse_temperatures=self.inverse_temperatures,
            legacy_nll_t=None if self.legacy_nll_t is None else self.legacy_nll_t[index],
        )

    def dedupe(self) -> tuple[Records, int]:
        """Keep the first arrival of every sample id; records without ids are all kept.

        DistributedSampler pads the last batch by repeating samples on some
        ranks; counting them twice would bias every metric. Returns the kept
        records (sorted by sample id where ids exist, so the result does not
        depend on arrival order of distinct ids) and how many were dropped.
        """
        has_id = self.sample_id >= 0
        if not has_id.any():
            return self, 0
        ids = self.sample_id[has_id]
        # np.unique returns the index of the first occurrence of each id.
        _, first = np.unique(ids, return_index=True)
        keep = np.flatnonzero(has_id)[first]
        dropped = int(has_id.sum()) - len(keep)
        rest = np.flatnonzero(~has_id)
        return self.take(np.concatenate([keep, rest])), dropped

    def _columns(self) -> list[tuple[str, str, npt.NDArray[np.generic]]]:
        """(name, dtype, array) of every stored column: version 3's, or a legacy blob's."""
        if self.legacy_nll_t is None:
            return [(name, dt, getattr(self, name)) for name, dt in FIELDS.items()]
        out = [(n, dt, getattr(self, n)) for n, dt in FIELDS.items() if n not in MODEL_FIELDS]
        return [*out, (LEGACY_NLL_T[0], LEGACY_NLL_T[1], self.legacy_nll_t)]

    def nbytes_per_sample(self) -> float:
        """Size of one record in the binary form (the header aside)."""
        return float(sum(np.dtype(dt).itemsize * int(np.prod(a.shape[1:])) for _, dt, a in self._columns()))

    def to_bytes(self) -> bytes:
        """The binary form; legacy records are written back as the version-2 blob they came from."""
        columns = self._columns()
        if not self.legacy:
            dims = {name: tuple(a.shape[1:]) for name, _, a in columns}
            chunks = [blob_head(len(self), self.inverse_temperatures, dims)]
        else:
            header = {
                "n": len(self),
                "inverse_temperatures": [float(a) for a in self.inverse_temperatures],
                "fields": [[name, dt, list(a.shape[1:])] for name, dt, a in columns],
            }
            head = json.dumps(header, separators=(",", ":")).encode()
            chunks = [MAGIC, struct.pack("<BI", LEGACY_VERSION, len(head)), head]
        chunks += [np.ascontiguousarray(a, dtype=dt).tobytes() for _, dt, a in columns]
        return b"".join(chunks)

    @classmethod
    def from_bytes(cls, data: bytes | memoryview) -> Records:
        view = memoryview(data)
        if bytes(view[:5]) != MAGIC:
            raise ValueError("not an evalstream records blob (bad magic)")
        version, hlen = struct.unpack_from("<BI", view, 5)
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"records blob version {version} is not supported (this build reads "
                f"{', '.join(map(str, READABLE_VERSIONS))})"
            )
        start = 5 + struct.calcsize("<BI")
        header = json.loads(bytes(view[start : start + hlen]))
        offset = start + hlen
        n = int(header["n"])
        arrays: dict[str, np.ndarray] = {}
        known = set(FIELDS) | ({LEGACY_NLL_T[0]} if version < VERSION else set())
        for name, dtype, dims in header["fields"]:
            if name not in known:
                raise ValueError(f"records blob has unknown field {name!r}")
            shape = (n, *dims)
            count = int(np.prod(shape))
            arr = np.frombuffer(view, dtype=dtype, count=count, offset=offset).reshape(shape)
            offset += arr.nbytes
            arrays[name] = arr
        if offset != len(view):
            raise ValueError(f"records blob has {len(view) - offset} trailing bytes")
        if version == 1:
            # Written before ties were counted: tie-free by construction (see the module docstring).
            arrays["ties"] = np.zeros(n, dtype=FIELDS["ties"])
        legacy = arrays.pop(LEGACY_NLL_T[0], None)
        if version < VERSION:
            # No temperature model before version 3 (see the module docstring).
            for name in MODEL_FIELDS:
                arrays[name] = np.empty((n, 0), FIELDS[name])
            if legacy is None:
                raise ValueError(f"records blob of version {version} lacks field 'nll_t'")
        missing = set(FIELDS) - set(arrays)
        if missing:
            raise ValueError(f"records blob lacks fields {sorted(missing)}")
        return cls(
            **arrays,
            inverse_temperatures=np.asarray(header["inverse_temperatures"], dtype=np.float64),
            legacy_nll_t=legacy,
        )
