"""Chunking, block size, rank order, half-precision inputs, dedupe and the binary form."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evalstream.service.engine import EngineConfig, Records
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.records import FIELDS
from evalstream.service.engine.reducer import ChunkReducer
from tests.engine.data import TEST_CONFIG, make_data


def _flat(d: object, prefix: str = "") -> dict[str, float]:
    """Every number in a report's dict form, by path."""
    out: dict[str, float] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}"))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out.update(_flat(v, f"{prefix}[{i}]"))
    elif isinstance(d, (int, float)):
        out[prefix] = float(d)
    return out


def _assert_reports_close(a: dict, b: dict, rel: float) -> None:
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k] == pytest.approx(fb[k], rel=rel, abs=1e-300), k


@pytest.mark.parametrize("num_classes", [10, 3000])
def test_chunking_and_rank_order_change_nothing(num_classes: int) -> None:
    n = 1200 if num_classes == 3000 else 4000
    data = make_data(num_classes, n, 31)
    whole = ChunkReducer(num_classes, TEST_CONFIG).reduce(data.logits, data.labels, data.sample_ids)
    base = compute_metrics(whole, num_classes, TEST_CONFIG).to_dict(per_class=True)
    rng = np.random.default_rng(7)
    for block_rows in (1, 37, 4096):
        reducer = ChunkReducer(num_classes, EngineConfig(device="cpu", block_rows=block_rows))
        cuts = np.sort(rng.choice(np.arange(1, n), size=9, replace=False))
        parts = [
            reducer.reduce(data.logits[a:b], data.labels[a:b], data.sample_ids[a:b])
            for a, b in zip([0, *cuts], [*cuts, n], strict=True)
        ]
        rng.shuffle(parts)  # ranks arrive in any order
        merged = Records.concat(parts)
        for name in FIELDS:  # the per-row arithmetic does not depend on the block a row is in
            order = np.argsort(merged.sample_id)
            np.testing.assert_array_equal(
                getattr(merged, name)[order], getattr(whole, name)[np.argsort(whole.sample_id)]
            )
        _assert_reports_close(
            compute_metrics(merged, num_classes, TEST_CONFIG).to_dict(per_class=True), base, 1e-12
        )
        # Without sample ids nothing is sorted by id: a permutation must still change nothing.
        no_ids = Records.concat(
            [
                reducer.reduce(data.logits[a:b], data.labels[a:b])
                for a, b in zip([0, *cuts], [*cuts, n], strict=True)
            ]
        )
        perm = no_ids.take(rng.permutation(n))
        _assert_reports_close(
            compute_metrics(perm, num_classes, TEST_CONFIG).to_dict(per_class=True),
            compute_metrics(no_ids, num_classes, TEST_CONFIG).to_dict(per_class=True),
            1e-12,
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_equal_float32_on_upcast_values(dtype: torch.dtype) -> None:
    data = make_data(3000, 600, 41, scale=1.0)
    half = torch.from_numpy(data.logits).to(dtype)
    reducer = ChunkReducer(3000, TEST_CONFIG)
    got = reducer.reduce(half, data.labels)
    want = reducer.reduce(half.float().numpy(), data.labels)
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    if dtype == torch.float16:  # numpy float16 arrays are accepted too
        from_numpy = reducer.reduce(half.numpy(), data.labels)
        np.testing.assert_array_equal(from_numpy.nll, want.nll)


def test_non_contiguous_and_int32_inputs() -> None:
    data = make_data(100, 300, 42)
    reducer = ChunkReducer(100, TEST_CONFIG)
    want = reducer.reduce(data.logits, data.labels)
    wide = np.zeros((300, 200), dtype=np.float32)
    wide[:, ::2] = data.logits
    got = reducer.reduce(wide[:, ::2], data.labels.astype(np.int32))
    np.testing.assert_array_equal(got.nll_t, want.nll_t)
    np.testing.assert_array_equal(got.rank, want.rank)


def test_dedupe_keeps_first_arrival() -> None:
    data = make_data(100, 1000, 51)
    reducer = ChunkReducer(100, TEST_CONFIG)
    unique = reducer.reduce(data.logits, data.labels, data.sample_ids)
    # A second rank re-sends 50 ids (DistributedSampler padding) with different logits: the first wins.
    dup_rows = np.arange(50)
    other = make_data(100, 50, 52)
    resent = reducer.reduce(other.logits, data.labels[dup_rows], data.sample_ids[dup_rows])
    merged = Records.concat([unique, resent])
    rep = compute_metrics(merged, 100, TEST_CONFIG)
    assert rep.duplicates_dropped == 50
    assert rep.num_samples == 1000
    _assert_reports_close(
        rep.to_dict(),
        {**compute_metrics(unique, 100, TEST_CONFIG).to_dict(), "duplicates_dropped": 50},
        1e-12,
    )
    # Arrival order decides: the re-sent copy first means its values count.
    flipped = compute_metrics(Records.concat([resent, unique]), 100, TEST_CONFIG)
    assert flipped.duplicates_dropped == 50
    assert flipped.loss.mean != pytest.approx(rep.loss.mean, rel=1e-9)
    # dedupe=False counts every record.
    assert compute_metrics(merged, 100, TEST_CONFIG, dedupe=False).num_samples == 1050


def test_records_round_trip_and_size() -> None:
    data = make_data(3000, 200, 61)
    recs = ChunkReducer(3000, EngineConfig(device="cpu")).reduce(data.logits, data.labels, data.sample_ids)
    blob = recs.to_bytes()
    back = Records.from_bytes(blob)
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(back, name), getattr(recs, name))
        assert getattr(back, name).dtype == np.dtype(FIELDS[name])
    np.testing.assert_array_equal(back.inverse_temperatures, recs.inverse_temperatures)
    assert recs.nbytes_per_sample() == 126 <= 128  # 38 bytes of scalars, 3 gaps, 19 grid points
    assert len(blob) < 128 * len(recs) + 1024  # header aside, at most 128 bytes a sample
    assert data.logits[0].nbytes == 12000  # against 12 KB of logits a sample
    with pytest.raises(ValueError, match="trailing"):
        Records.from_bytes(blob + b"\0")
    with pytest.raises(ValueError, match="magic"):
        Records.from_bytes(b"X" + blob[1:])


def test_empty_chunk_is_a_no_op() -> None:
    reducer = ChunkReducer(100, TEST_CONFIG)
    empty = reducer.reduce(np.zeros((0, 100), np.float32), np.zeros(0, np.int64))
    assert len(empty) == 0
    assert empty.nll_t.shape == (0, len(TEST_CONFIG.inverse_temperatures))
    data = make_data(100, 100, 71)
    recs = reducer.reduce(data.logits, data.labels)
    merged = Records.concat([recs, empty])
    _assert_reports_close(
        compute_metrics(merged, 100, TEST_CONFIG).to_dict(),
        compute_metrics(recs, 100, TEST_CONFIG).to_dict(),
        0.0,
    )
