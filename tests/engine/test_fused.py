"""The compiled backend: its math (run eagerly, no compile), then one compiled kernel per score dtype.

Compiling costs seconds (tens cold), so every compiled test shares the kernels of
one key per dtype: C = 3,000, the default grid, one thread (conftest).
"""

from __future__ import annotations

import itertools
import logging
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from evalstream.service.engine import ChunkError, EngineConfig, Records
from evalstream.service.engine.fused import KernelKey, _powers, kernel_for, make_row_pass
from evalstream.service.engine.moments import RestMoments
from evalstream.service.engine.powers import ladder
from evalstream.service.engine.records import FIELDS
from evalstream.service.engine.reducer import ChunkReducer, resolve_backend
from tests.engine import reference as ref
from tests.engine.data import TEST_CONFIG, Data, make_data

C = 3000
COMPILED = EngineConfig(device="cpu", block_rows=256, backend="compiled")
FLOATS = ("nll", "confidence", "brier", "entropy")
MODEL = ("log_rest", "rest_slope", "rest_curvature")
# log_rest takes b = k/20 as products of one exponential (k <= 400): ~k/2 float32 ulps; the
# derivatives are float16 (4.9e-4 relative).
TOLERANCE = {"log_rest": 3e-5, "rest_slope": 1e-3, "rest_curvature": 1e-3}


def _records_from_row_pass(
    num_classes: int, cfg: EngineConfig, logits: np.ndarray, labels: np.ndarray
) -> dict:
    row_pass = make_row_pass(num_classes, cfg.inverse_temperatures, cfg.max_rank)
    with torch.no_grad():
        floats, ints, _ = row_pass(torch.from_numpy(logits), torch.from_numpy(labels))
    f = floats.numpy().astype(np.float64)
    return {
        "nll": f[:, 0],
        "confidence": f[:, 1],
        "brier": f[:, 2],
        "entropy": f[:, 3],
        "pred": ints[:, 0].numpy(),
        "rank": ints[:, 1].numpy(),
        "ties": ints[:, 2].numpy(),
    }


@pytest.mark.parametrize(
    "grid",
    [
        (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0),
        (1.0,),
        (0.5, 1.0, 2.0, 8.0),
        (0.3, 0.7, 1.0, 1.75, 3.3, 6.0, 20.0),  # direct points, a 7/4 ladder point, one beyond the ladder
    ],
)
@pytest.mark.parametrize("num_classes", [10, 3000])
def test_row_pass_math_matches_the_float64_reference(grid: tuple[float, ...], num_classes: int) -> None:
    cfg = EngineConfig(device="cpu", inverse_temperatures=grid)
    data = make_data(num_classes, 400, 5)
    got = _records_from_row_pass(num_classes, cfg, data.logits, data.labels)
    exp = ref.per_sample(data.logits, data.labels, np.asarray(grid))
    np.testing.assert_array_equal(got["rank"], exp["rank"])
    np.testing.assert_array_equal(got["ties"], exp["ties"])
    np.testing.assert_array_equal(got["pred"], exp["pred"])
    for name in FLOATS:
        tol = TOLERANCE.get(name, 2e-6)
        np.testing.assert_allclose(got[name], exp[name], rtol=tol, atol=tol, err_msg=name)


def test_ladder_plans_and_powers() -> None:
    assert ladder((1.0,)).step == 1.0 and ladder((1.0,)).needed() == (1, 2)
    lad = ladder((0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0))
    assert lad.step == 0.25 and lad.exponents == (1, 2, 3, 4, 5, 6, 8, 10, 12, 16)
    assert ladder((0.5, 1.0, 3.0)).exponents == (1, 2, 6)
    assert ladder((0.3, 1.0, 100.0)).exponents == (None, 1, None)  # not dyadic; beyond MAX_EXPONENT
    q = torch.rand(5, 7, dtype=torch.float64)
    for k, v in _powers(q, (1, 2, 3, 5, 6, 12, 16, 23)).items():
        torch.testing.assert_close(v, q**k, rtol=1e-13, atol=0)


def test_auto_is_eager_without_a_compiler(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    assert resolve_backend("auto", torch.device("cpu")) == "eager"
    assert ChunkReducer(10, EngineConfig(device="cpu", backend="auto")).active_backend() == "eager"
    assert resolve_backend("compiled", torch.device("cpu")) == "compiled"  # tries, then falls back


def test_a_failing_compile_falls_back_to_eager(caplog: pytest.LogCaptureFixture) -> None:
    import torch._inductor.config as inductor_config

    key = KernelKey(7, (1.0,), 65535, torch.float32, "cpu", torch.get_num_threads())
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/c++")}), caplog.at_level(logging.WARNING):
        assert kernel_for(key) is None
    assert "using the eager pass" in caplog.text
    assert kernel_for(key) is None  # remembered: no second attempt


# -- compiled (one kernel per dtype for the whole module) ---------------------------------------


@pytest.fixture(scope="module")
def compiled() -> ChunkReducer:
    torch.set_num_threads(1)
    reducer = ChunkReducer(C, COMPILED)
    # Compiled in a worker thread, as the service's executor does.
    with ThreadPoolExecutor(1) as pool:
        backend = pool.submit(reducer.active_backend).result()
    if backend != "compiled":
        pytest.fail("the fused pass did not compile here (a C++ compiler is needed); see the log")
    return reducer


@pytest.fixture(scope="module")
def data() -> Data:
    return make_data(C, 1500, 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_pass_where_the_native_kernel_is_unavailable(
    compiled: ChunkReducer, data: Data, dtype: torch.dtype
) -> None:
    """On the CPU the compiled backend runs the native row pass (rest_moments.c); where that cannot be
    built TorchInductor's kernel runs instead, with the model's sums from PyTorch: the same records."""
    assert compiled.moments.has_rows
    fallback = ChunkReducer(C, COMPILED)
    fallback.moments = RestMoments(COMPILED.inverse_temperatures, C, native_kernel=False)
    assert fallback.active_backend(dtype) == "compiled" and not fallback._native_rows()
    scores = torch.from_numpy(data.logits[:300]).to(dtype)
    got = compiled.reduce(scores, data.labels[:300])
    want = fallback.reduce(scores, data.labels[:300])
    for name in ("pred", "rank", "ties"):
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)
    for name in FLOATS + MODEL:
        tol = TOLERANCE.get(name, 2e-6)
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), rtol=tol, atol=tol, err_msg=name)


def test_compiled_matches_eager_and_the_reference(compiled: ChunkReducer, data: Data) -> None:
    got = compiled.reduce(data.logits, data.labels, data.sample_ids)
    eager = ChunkReducer(C, TEST_CONFIG).reduce(data.logits, data.labels, data.sample_ids)
    exp = ref.per_sample(data.logits, data.labels, np.asarray(TEST_CONFIG.inverse_temperatures))
    for name in ("sample_id", "label", "pred", "rank"):
        np.testing.assert_array_equal(getattr(got, name), getattr(eager, name), err_msg=name)
    np.testing.assert_array_equal(got.rank, exp["rank"])
    for name in FLOATS + MODEL:
        tol = TOLERANCE.get(name, 2e-6)
        np.testing.assert_allclose(getattr(got, name), getattr(eager, name), rtol=tol, atol=tol, err_msg=name)
        np.testing.assert_allclose(
            getattr(got, name).astype(np.float64), exp[name], rtol=tol, atol=tol, err_msg=name
        )
    # The model's columns come from the same code in both backends: the same bits.
    for name in MODEL:
        np.testing.assert_array_equal(getattr(got, name), getattr(eager, name), err_msg=name)
    # The model at T = 1 is the NLL itself, to float32 rounding.
    np.testing.assert_allclose(got.nll_t[:, TEST_CONFIG.inverse_temperatures.index(1.0)], got.nll, rtol=2e-6)


def test_compiled_records_do_not_depend_on_chunking_or_layout(compiled: ChunkReducer, data: Data) -> None:
    logits, labels, ids = data.logits, data.labels, data.sample_ids
    whole = compiled.reduce(logits, labels, ids)
    cuts = [0, 1, 2, 39, 40, 1000, 1499, 1500]  # one-row chunks (padded) and odd sizes
    parts = Records.concat(
        [compiled.reduce(logits[a:b], labels[a:b], ids[a:b]) for a, b in itertools.pairwise(cuts)]
    )
    wide = np.zeros((len(labels), 2 * C), np.float32)
    wide[:, 1::2] = logits
    strided = compiled.reduce(wide[:, 1::2], labels.astype(np.int32), ids)
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(parts, name), getattr(whole, name), err_msg=name)
        np.testing.assert_array_equal(getattr(strided, name), getattr(whole, name), err_msg=name)


def test_compiled_bfloat16_equals_compiled_float32_of_the_upcast_values(
    compiled: ChunkReducer, data: Data
) -> None:
    half = torch.from_numpy(data.logits[:500]).to(torch.bfloat16)
    labels = data.labels[:500]
    assert compiled.active_backend(torch.bfloat16) == "compiled"
    got = compiled.reduce(half, labels)
    want = compiled.reduce(half.float().numpy(), labels)
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


@pytest.mark.parametrize(
    ("row", "col", "value", "message"),
    [(250, 17, np.nan, r"scores\[250, 17\] = nan"), (0, 2999, -np.inf, r"scores\[0, 2999\] = -inf")],
)
def test_compiled_rejects_like_eager(
    compiled: ChunkReducer, data: Data, row: int, col: int, value: float, message: str
) -> None:
    logits = data.logits[:300].copy()
    logits[row, col] = value
    labels = data.labels[:300]
    for reducer in (compiled, ChunkReducer(C, TEST_CONFIG)):
        with pytest.raises(ChunkError, match=message) as err:
            reducer.reduce(logits, labels)
        assert err.value.reason == "non_finite"
    logp = torch.log_softmax(torch.from_numpy(data.logits[:300]), dim=1)
    logp[7] += 0.1
    lp_reducer = ChunkReducer(C, COMPILED, score_kind="log_probabilities")
    with pytest.raises(ChunkError, match=r"row 7 has logsumexp 0\.(1|0999)") as err:
        lp_reducer.reduce(logp, labels)
    assert err.value.reason == "log_probabilities_invalid"
    assert len(lp_reducer.reduce(torch.log_softmax(logp, dim=1), labels)) == 300


def test_compiled_kernel_serves_threads_at_once(compiled: ChunkReducer, data: Data) -> None:
    """The service reduces chunks of several streams in executor threads, one reducer each."""
    cuts = [(0, 400), (400, 900), (900, 1500)] * 2
    want = [compiled.reduce(data.logits[a:b], data.labels[a:b]) for a, b in cuts]
    with ThreadPoolExecutor(3) as pool:
        got = list(
            pool.map(
                lambda ab: ChunkReducer(C, COMPILED).reduce(
                    data.logits[ab[0] : ab[1]], data.labels[ab[0] : ab[1]]
                ),
                cuts,
            )
        )
    for g, w in zip(got, want, strict=True):
        for name in FIELDS:
            np.testing.assert_array_equal(getattr(g, name), getattr(w, name), err_msg=name)


def test_row_pass_follows_the_tie_rule() -> None:
    z = np.array(
        [[1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 3.0, 1.0], [5.0, 5.0, 0.0, 2.0], [2.0, 2.0, 2.0, 2.5]], np.float32
    )
    got = _records_from_row_pass(4, EngineConfig(), z, np.array([3, 2, 3, 0]))
    np.testing.assert_array_equal(got["rank"], [0, 0, 2, 1])
    np.testing.assert_array_equal(got["ties"], [3, 1, 0, 2])
    np.testing.assert_array_equal(got["pred"], [0, 1, 0, 3])  # argmax: the lowest index of the maxima


def test_compiled_bfloat16_ties_equal_eager(compiled: ChunkReducer) -> None:
    gen = torch.Generator().manual_seed(3)
    z = ((torch.randn(400, C, generator=gen) * 4).round() / 4).to(torch.bfloat16)  # many ties
    y = torch.randint(0, C, (400,), generator=gen)
    got = compiled.reduce(z, y)
    want = ChunkReducer(C, TEST_CONFIG).reduce(z, y)
    zf = z.float().numpy()
    assert (np.sum(zf == zf[np.arange(400), y.numpy()][:, None], axis=1) > 1).sum() > 50
    np.testing.assert_array_equal(got.rank, want.rank)
    np.testing.assert_array_equal(got.ties, want.ties)
    np.testing.assert_array_equal(got.pred, want.pred)
