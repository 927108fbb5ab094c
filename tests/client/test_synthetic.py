"""The synthetic validation set: deterministic, split-independent, and built as specified."""

from __future__ import annotations

import numpy as np

from evalstream.client.synthetic import VARIANTS, SyntheticValidationSet


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_same_seed_same_data_and_ranks_partition_the_samples() -> None:
    a = SyntheticValidationSet(num_samples=700, num_classes=300, seed=3)
    b = SyntheticValidationSet(num_samples=700, num_classes=300, seed=3)
    assert np.array_equal(a.batch("sharp", 1, 256)[0], b.batch("sharp", 1, 256)[0])
    whole = list(a.batches("smooth", 256))
    ranks = [list(a.batches("smooth", 256, rank=r, world_size=2)) for r in (0, 1)]
    ids = np.sort(np.concatenate([ids for part in ranks for _, _, ids in part]))
    assert np.array_equal(ids, np.arange(700))
    assert sum(a.rank_samples(256, r, 2) for r in (0, 1)) == 700
    assert np.array_equal(ranks[1][0][0], whole[1][0])  # rank 1 gets batch 1, unchanged
    other_seed = SyntheticValidationSet(num_samples=700, num_classes=300, seed=4)
    assert not np.array_equal(other_seed.labels, a.labels)


def test_labels_are_zipf_imbalanced() -> None:
    data = SyntheticValidationSet(num_samples=20_000, num_classes=3_000, seed=0)
    counts = np.bincount(data.labels, minlength=3_000)
    assert counts[0] == counts.max()
    assert counts[0] / 20_000 > 0.08  # the head class alone holds ~12% of the labels
    assert (counts == 0).sum() > 300  # and many tail classes never appear


def test_logits_have_the_planned_top1_confidence_and_true_class_share() -> None:
    data = SyntheticValidationSet(num_samples=512, num_classes=500, seed=1)
    for variant in VARIANTS:
        logits, labels, ids = data.batch(variant.name, 0, 512)
        plan = data._plans[variant.name]
        p = _softmax(logits.astype(np.float64) / variant.scale)  # undo the temperature
        top = p.argmax(axis=1)
        assert np.array_equal(top, plan.target[ids])
        assert np.allclose(p.max(axis=1), plan.confidence[ids], atol=1e-4)
        assert np.array_equal(top != labels, plan.wrong[ids])
        boosted = plan.boosted[ids]
        rows = np.flatnonzero(boosted)
        share = p[rows, labels[rows]] / (1 - p[rows, top[rows]])
        assert np.allclose(share, plan.true_share[ids][rows], atol=1e-3)
