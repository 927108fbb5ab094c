"""The tie rule: rank counts strictly larger scores; top-k correct iff rank < k; pred = label at rank 0."""

from __future__ import annotations

import numpy as np
import torch

from evalstream.service.engine import EngineConfig
from evalstream.service.engine.metrics import compute_metrics
from evalstream.service.engine.reducer import ChunkReducer

CFG = EngineConfig(device="cpu", top_k=(1, 2, 3))


def test_purpose_built_ties() -> None:
    z = np.array(
        [
            [1.0, 1.0, 1.0, 1.0],  # all equal: rank 0, correct, pred = label
            [0.0, 3.0, 3.0, 1.0],  # label 2 ties the max with class 1: correct, pred = 2
            [5.0, 5.0, 0.0, 2.0],  # classes 0 and 1 tie above label 3: rank 2, pred = 0
            [2.0, 2.0, 2.0, 2.5],  # label 0 under one larger: rank 1, pred = 3
        ],
        dtype=np.float32,
    )
    labels = np.array([3, 2, 3, 0])
    recs = ChunkReducer(4, CFG).reduce(z, labels)
    np.testing.assert_array_equal(recs.rank, [0, 0, 2, 1])
    np.testing.assert_array_equal(recs.pred, [3, 2, 0, 3])
    rep = compute_metrics(recs, 4, CFG)
    assert rep.top_k == {1: 0.5, 2: 0.75, 3: 1.0}
    # top-1 accuracy agrees with the top-1 prediction.
    assert rep.top_k[1] == float(np.mean(recs.pred == recs.label))
    assert [(p.label, p.prediction) for p in rep.imbalance.top_confusions] == [(0, 3), (3, 0)]


def test_bfloat16_ties_follow_the_rule() -> None:
    gen = torch.Generator().manual_seed(3)
    z = ((torch.randn(400, 50, generator=gen) * 4).round() / 4).to(torch.bfloat16)  # many ties
    y = torch.randint(0, 50, (400,), generator=gen)
    recs = ChunkReducer(50, CFG).reduce(z, y)
    zf = z.float().numpy()
    zy = zf[np.arange(400), y.numpy()]
    assert (np.sum(zf == zy[:, None], axis=1) > 1).sum() > 50  # the data really has ties at the label
    rank = (zf > zy[:, None]).sum(axis=1)
    np.testing.assert_array_equal(recs.rank, rank)
    np.testing.assert_array_equal(recs.pred, np.where(rank == 0, y.numpy(), zf.argmax(axis=1)))
    assert (recs.pred == recs.label).sum() == (recs.rank == 0).sum()
