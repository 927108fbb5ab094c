"""Ties never flatter a model: top-k accuracy is the expected accuracy under random tie-breaking.

A sample whose label has ``g`` strictly higher classes and ``e`` exactly equal ones gets top-k
credit ``clip((k - g) / (e + 1), 0, 1)``; the binary views (``pred``, confusions, precision) use
``argmax`` (the lowest index among the maxima). Both backends, every score dtype.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch

from evalstream.service.engine import EngineConfig
from evalstream.service.engine.metrics import TIE_WARNING_SHARE, compute_metrics
from evalstream.service.engine.records import FIELDS, MAGIC, MODEL_FIELDS, Records
from evalstream.service.engine.reducer import ChunkReducer
from tests.engine import reference as ref

CFG = EngineConfig(device="cpu", top_k=(1, 2, 3))
BACKENDS = ("eager", "compiled")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _reduce(backend: str, num_classes: int, scores: torch.Tensor, labels: torch.Tensor, **cfg: object):
    config = EngineConfig(device="cpu", backend=backend, **cfg)  # type: ignore[arg-type]
    reducer = ChunkReducer(num_classes, config)
    if backend == "compiled" and reducer.active_backend(scores.dtype) != "compiled":
        pytest.fail("the fused pass did not compile here (a C++ compiler is needed)")
    return reducer.reduce(scores, labels), config


def test_purpose_built_ties() -> None:
    z = np.array(
        [
            [1.0, 1.0, 1.0, 1.0],  # all equal: g = 0, e = 3 -> top-k credit k / 4
            [0.0, 3.0, 3.0, 1.0],  # label 2 ties the max with class 1: g = 0, e = 1 -> 1/2, 1, 1
            [5.0, 5.0, 0.0, 2.0],  # classes 0 and 1 above label 3: g = 2, e = 0 -> 0, 0, 1
            [2.0, 2.0, 2.0, 2.5],  # label 0: g = 1, e = 2 -> 0, 1/3, 2/3
        ],
        dtype=np.float32,
    )
    labels = np.array([3, 2, 3, 0])
    recs = ChunkReducer(4, CFG).reduce(z, labels)
    np.testing.assert_array_equal(recs.rank, [0, 0, 2, 1])
    np.testing.assert_array_equal(recs.ties, [3, 1, 0, 2])
    np.testing.assert_array_equal(recs.pred, z.argmax(axis=1))  # [0, 1, 0, 3]
    np.testing.assert_allclose(recs.topk_credit(1), [1 / 4, 1 / 2, 0, 0])
    np.testing.assert_allclose(recs.topk_credit(2), [2 / 4, 1, 0, 1 / 3])
    np.testing.assert_allclose(recs.topk_credit(3), [3 / 4, 1, 1, 2 / 3])
    rep = compute_metrics(recs, 4, CFG)
    assert rep.top_k[1] == pytest.approx((1 / 4 + 1 / 2) / 4, abs=1e-15)
    assert rep.top_k[2] == pytest.approx((2 / 4 + 1 + 1 / 3) / 4, abs=1e-15)
    assert rep.top_k[3] == pytest.approx((3 / 4 + 1 + 1 + 2 / 3) / 4, abs=1e-15)
    # The binary view: argmax is right on no row here (labels 3, 2, 3, 0 vs argmax 0, 1, 0, 3).
    assert not recs.correct.any()
    assert [(p.label, p.prediction) for p in rep.imbalance.top_confusions] == [(3, 0), (0, 3), (2, 1)]
    assert rep.label_tie_share == 0.75


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_constant_logits_score_exactly_chance(backend: str, dtype: torch.dtype) -> None:
    """A collapsed model (every class the same score) is at chance on every accuracy, exactly."""
    c, n = 1000, 2000
    gen = torch.Generator().manual_seed(11)
    labels = torch.randint(0, c, (n,), generator=gen)
    for value in (0.0, 65504.0 if dtype == torch.float16 else 3.0):
        scores = torch.full((n, c), value, dtype=dtype)
        recs, config = _reduce(backend, c, scores, labels, top_k=(1, 5))
        np.testing.assert_array_equal(recs.ties, np.full(n, c - 1))
        np.testing.assert_array_equal(recs.pred, np.zeros(n))  # argmax of a constant row
        rep = compute_metrics(recs, c, config)
        assert rep.top_k[1] == pytest.approx(1 / c, rel=1e-14)  # float64 rounding of the sum only
        assert rep.top_k[5] == pytest.approx(5 / c, rel=1e-14)
        assert rep.imbalance.balanced_accuracy == pytest.approx(1 / c, rel=1e-12)
        assert all(b.accuracy == pytest.approx(1 / c, rel=1e-12) for b in rep.imbalance.buckets)
        # Calibration sees confidence 1/C and accuracy 1/C: perfectly calibrated chance.
        assert rep.calibration.ece == pytest.approx(0.0, abs=1e-6)
        assert rep.label_tie_share == 1.0 and rep.label_tie_share > TIE_WARNING_SHARE
        assert rep.scalars()["accuracy_top1"] == rep.top_k[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_saturated_halves_get_the_closed_form_credit(backend: str) -> None:
    """Half of each row 0 and half -1 (bfloat16): a label in the top half shares the top with
    C/2 - 1 others; a label in the bottom half is beaten by C/2 classes."""
    c, n = 1000, 2000
    gen = torch.Generator().manual_seed(5)
    top_half = torch.rand(n, c, generator=gen).argsort(dim=1) < c // 2
    scores = torch.where(top_half, 0.0, -1.0).to(torch.bfloat16)
    labels = torch.randint(0, c, (n,), generator=gen)
    recs, config = _reduce(backend, c, scores, labels, top_k=(1, 5))
    label_on_top = top_half[torch.arange(n), labels].numpy()
    rep = compute_metrics(recs, c, config)
    for k in (1, 5):
        want = np.where(label_on_top, k / (c // 2), 0.0)
        np.testing.assert_allclose(recs.topk_credit(k), want, rtol=1e-15)
        assert rep.top_k[k] == pytest.approx(want.mean(), rel=1e-12)
    assert rep.top_k[1] < 0.002  # not the 0.497 the label-favouring rule reported


def _random_tie_break_accuracy(z: np.ndarray, labels: np.ndarray, k: int, trials: int, seed: int) -> float:
    """Top-k accuracy of argmax-style predictions when ties are broken by a random class order,
    averaged over ``trials`` orders: what the credit's expectation claims."""
    rng = np.random.default_rng(seed)
    n, c = z.shape
    hits = 0.0
    for _ in range(trials):
        jitter = rng.permutation(c).astype(np.float64) / c  # a random strict order among equals
        order = np.lexsort((-jitter[None, :].repeat(n, 0), -z), axis=1)[:, :k]
        hits += float((order == labels[:, None]).any(axis=1).mean())
    return hits / trials


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_low_precision_data_matches_random_tie_breaking_in_expectation(backend: str) -> None:
    c, n = 50, 400
    gen = torch.Generator().manual_seed(3)
    z = ((torch.randn(n, c, generator=gen) * 2).round() / 2).to(torch.bfloat16)  # many exact ties
    y = torch.randint(0, c, (n,), generator=gen)
    recs, config = _reduce(backend, c, z, y, top_k=(1, 3))
    zf, yn = z.float().numpy().astype(np.float64), y.numpy()
    exp = ref.per_sample(zf.astype(np.float32), yn, np.asarray(config.inverse_temperatures))
    assert (exp["ties"] > 0).mean() > 0.1  # the data really has ties at the label
    np.testing.assert_array_equal(recs.rank, exp["rank"])
    np.testing.assert_array_equal(recs.ties, exp["ties"])
    np.testing.assert_array_equal(recs.pred, zf.argmax(axis=1))  # == torch.argmax / numpy.argmax
    np.testing.assert_array_equal(recs.pred, z.float().argmax(dim=1).numpy())
    rep = compute_metrics(recs, c, config)
    for k in (1, 3):
        closed = ref.topk_credit(exp["rank"], exp["ties"], k)
        assert rep.top_k[k] == pytest.approx(closed.mean(), rel=1e-12)
        # 300 random tie-breaks: the standard error of their mean is well under 0.01 here.
        assert rep.top_k[k] == pytest.approx(_random_tie_break_accuracy(zf, yn, k, 300, k), abs=0.01)
    # Metrics needing one predicted class use argmax, matching peers exactly on tied data.
    from sklearn.metrics import precision_recall_fscore_support

    prec, _, f1, _ = precision_recall_fscore_support(yn, recs.pred, average="macro", zero_division=0)
    assert rep.imbalance.macro_precision == pytest.approx(prec, rel=1e-12)
    assert rep.imbalance.macro_f1 == pytest.approx(f1, rel=1e-12)


def test_tie_free_data_keeps_todays_values() -> None:
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(500, 300, generator=gen)
    y = torch.randint(0, 300, (500,), generator=gen)
    recs = ChunkReducer(300, CFG).reduce(z, y)
    assert not recs.ties.any()
    old_pred = np.where(recs.rank == 0, recs.label, z.argmax(dim=1).numpy())  # the old label-favouring rule
    np.testing.assert_array_equal(recs.pred, old_pred)
    for k in CFG.top_k:
        np.testing.assert_array_equal(recs.topk_credit(k), (recs.rank < k).astype(np.float64))
    rep = compute_metrics(recs, 300, CFG)
    assert rep.label_tie_share == 0.0


def test_version_1_records_read_as_tie_free() -> None:
    """Blobs written before the ties column existed read with ties = 0: that is what they were
    computed as (the old rule credited every tie to the label)."""
    gen = torch.Generator().manual_seed(1)
    recs = ChunkReducer(20, CFG).reduce(torch.randn(30, 20, generator=gen), torch.randint(0, 20, (30,)))
    old_fields = [name for name in FIELDS if name not in ("ties", *MODEL_FIELDS)]
    nll_t = recs.nll_t.astype(np.float32)  # versions 1 and 2 stored the grid NLLs
    header = {
        "n": len(recs),
        "inverse_temperatures": recs.inverse_temperatures.tolist(),
        "fields": [[name, FIELDS[name], list(getattr(recs, name).shape[1:])] for name in old_fields]
        + [["nll_t", "<f4", [nll_t.shape[1]]]],
    }
    head = json.dumps(header).encode()
    blob = MAGIC + struct.pack("<BI", 1, len(head)) + head
    blob += b"".join(np.ascontiguousarray(getattr(recs, name)).tobytes() for name in old_fields)
    blob += nll_t.tobytes()
    back = Records.from_bytes(blob)
    assert back.legacy
    np.testing.assert_array_equal(back.nll_t, nll_t)
    np.testing.assert_array_equal(back.ties, np.zeros(len(recs)))
    for name in old_fields:
        np.testing.assert_array_equal(getattr(back, name), getattr(recs, name))
    assert Records.from_bytes(recs.to_bytes()).ties.dtype == np.uint32
