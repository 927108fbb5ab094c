"""Every bad chunk is refused with a typed reason, and a refused chunk changes nothing."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch

from evalstream.service.engine import ChunkError, EngineConfig, Records
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer
from tests.engine.data import make_data

C = 100
CFG = EngineConfig(device="cpu", block_rows=64)
GOOD = make_data(C, 300, 81)


def _with(fn: Callable[[np.ndarray], None]) -> np.ndarray:
    z = GOOD.logits.copy()
    fn(z)
    return z


def _set(i: int, j: int, v: float) -> Callable[[np.ndarray], None]:
    def f(z: np.ndarray) -> None:
        z[i, j] = v

    return f


BAD_LABEL = GOOD.labels.copy()
BAD_LABEL[123] = C
NEG_LABEL = GOOD.labels.copy()
NEG_LABEL[7] = -1
NEG_ID = GOOD.sample_ids.copy()
NEG_ID[9] = -5

CASES: list[tuple[str, tuple, str]] = [
    ("shape_mismatch", (GOOD.logits, GOOD.labels[:-1]), "300 rows but labels have 299"),
    ("shape_mismatch", (GOOD.logits[0], GOOD.labels), "must be [n, C]"),
    ("shape_mismatch", (GOOD.logits, GOOD.labels[:, None]), "labels must be [n]"),
    ("class_count_mismatch", (GOOD.logits[:, :50], GOOD.labels), "50 classes"),
    ("label_out_of_range", (GOOD.logits, BAD_LABEL), f"labels[123] = {C}"),
    ("label_out_of_range", (GOOD.logits, NEG_LABEL), "labels[7] = -1"),
    ("label_dtype", (GOOD.logits, GOOD.labels.astype(np.float32)), "float32"),
    ("label_dtype", (GOOD.logits, GOOD.labels.astype(np.uint8)), "uint8"),
    ("score_dtype", (GOOD.logits.astype(np.float64), GOOD.labels), "float64"),
    ("score_dtype", (GOOD.logits.astype(np.int32), GOOD.labels), "int32"),
    ("sample_ids_length", (GOOD.logits, GOOD.labels, GOOD.sample_ids[:10]), "[300]"),
    ("sample_id_negative", (GOOD.logits, GOOD.labels, NEG_ID), "sample_ids[9] = -5"),
    ("non_finite", (_with(_set(250, 17, np.nan)), GOOD.labels), "scores[250, 17] = nan"),
    ("non_finite", (_with(_set(3, 4, np.inf)), GOOD.labels), "scores[3, 4] = inf"),
    ("non_finite", (_with(_set(299, 0, -np.inf)), GOOD.labels), "scores[299, 0] = -inf"),
]


@pytest.mark.parametrize(
    ("reason", "args", "needle"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)]
)
def test_rejected_chunk_leaves_state_unchanged(reason: str, args: tuple, needle: str) -> None:
    reducer = ChunkReducer(C, CFG)
    accepted = [reducer.reduce(GOOD.logits[:100], GOOD.labels[:100], GOOD.sample_ids[:100])]
    before = compute_metrics(Records.concat(accepted), C, CFG).to_dict(per_class=True)
    with pytest.raises(ChunkError) as err:
        accepted.append(reducer.reduce(*args))
    assert err.value.reason == reason
    assert needle in err.value.message, err.value.message
    assert len(accepted) == 1
    assert compute_metrics(Records.concat(accepted), C, CFG).to_dict(per_class=True) == before
    # The reducer's reused buffers were partly overwritten; its next result must not care.
    after = reducer.reduce(GOOD.logits[100:], GOOD.labels[100:], GOOD.sample_ids[100:])
    fresh = ChunkReducer(C, CFG).reduce(GOOD.logits[100:], GOOD.labels[100:], GOOD.sample_ids[100:])
    np.testing.assert_array_equal(after.nll_t, fresh.nll_t)
    np.testing.assert_array_equal(after.rank, fresh.rank)


def test_log_probabilities() -> None:
    logp = torch.log_softmax(torch.from_numpy(GOOD.logits), 1)
    as_logits = ChunkReducer(C, CFG).reduce(GOOD.logits, GOOD.labels)
    as_logp = ChunkReducer(C, CFG, score_kind="log_probabilities").reduce(logp, GOOD.labels)
    np.testing.assert_allclose(as_logp.nll, as_logits.nll, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(as_logp.rank, as_logits.rank)
    with pytest.raises(ChunkError) as err:
        ChunkReducer(C, CFG, score_kind="log_probabilities").reduce(GOOD.logits, GOOD.labels)
    assert err.value.reason == "log_probabilities_invalid"
    assert "row 0 has logsumexp" in err.value.message
