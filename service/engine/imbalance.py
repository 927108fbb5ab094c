"""Class-imbalance metrics from label/prediction pairs, without a dense C x C matrix.

Peers: scikit-learn's ``balanced_accuracy_score`` and
``precision_recall_fscore_support(average="macro", zero_division=0)``.

Two views of correctness meet here (docs/metrics.md, "Ties"): recall, balanced accuracy and
the head/torso/tail accuracies take each sample's top-1 *credit* (its expected correctness
under random tie-breaking), so ties never flatter a model; precision, F1, the confusions and
the prediction shift need one predicted class and take the binary view, ``pred = argmax``.
The two agree on tie-free data.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from evalstream.service.engine.report import ClassBucket, ConfusedPair, Imbalance, PerClass

BUCKETS = ("head", "torso", "tail")


def buckets(support: npt.NDArray[np.int64], correct: npt.NDArray[np.float64]) -> list[ClassBucket]:
    """Head / torso / tail: present classes ranked by support (descending, ties by class
    index), cut into thirds of the samples. A class belongs to the bucket its first
    sample falls in: bucket = floor(3 * (samples in classes ranked before it) / n),
    so a class straddling a cut stays whole in the earlier bucket."""
    n = int(support.sum())
    present = np.flatnonzero(support > 0)
    order = present[np.lexsort((present, -support[present]))]
    before = np.concatenate([[0], np.cumsum(support[order])[:-1]]) if len(order) else np.zeros(0, np.int64)
    which = (3 * before) // max(n, 1)
    out = []
    for i, name in enumerate(BUCKETS):
        cls = order[which == i]
        s = int(support[cls].sum())
        c = float(correct[cls].sum())
        out.append(ClassBucket(name, len(cls), s, c / s if s else 0.0))
    return out


def top_confusions(
    label: npt.NDArray[np.int32], pred: npt.NDArray[np.int32], num_classes: int, k: int
) -> list[ConfusedPair]:
    """The k most frequent (label, prediction) pairs among wrong samples: count descending,
    then label, then prediction ascending. Sparse: only observed pairs are counted."""
    wrong = label != pred
    if k <= 0 or not wrong.any():
        return []
    key = label[wrong].astype(np.int64) * num_classes + pred[wrong].astype(np.int64)
    uniq, counts = np.unique(key, return_counts=True)
    order = np.lexsort((uniq, -counts))[:k]  # uniq ascending == (label, pred) ascending
    return [
        ConfusedPair(int(uniq[i] // num_classes), int(uniq[i] % num_classes), int(counts[i])) for i in order
    ]


def imbalance(
    label: npt.NDArray[np.int32],
    pred: npt.NDArray[np.int32],
    credit: npt.NDArray[np.float64],
    num_classes: int,
    num_confusions: int,
) -> Imbalance:
    """``credit``: each sample's top-1 credit (recall side); ``pred``: argmax (precision side)."""
    n = len(label)
    support = np.bincount(label, minlength=num_classes).astype(np.int64)
    predicted = np.bincount(pred, minlength=num_classes).astype(np.int64)
    right = np.bincount(label[pred == label], minlength=num_classes).astype(np.int64)
    credited: npt.NDArray[np.float64] = np.bincount(
        label, weights=np.asarray(credit, np.float64), minlength=num_classes
    ).astype(np.float64)
    present = support > 0
    # Classes present in the labels or the predictions (scikit-learn's unique_labels).
    seen = present | (predicted > 0)
    recall = credited[present] / support[present]
    precision = np.divide(right, predicted, out=np.zeros(num_classes), where=predicted > 0)
    denom = support + predicted
    f1 = np.divide(2.0 * right, denom, out=np.zeros(num_classes), where=denom > 0)
    return Imbalance(
        balanced_accuracy=float(recall.mean()) if n else 0.0,
        macro_precision=float(precision[seen].mean()) if n else 0.0,
        macro_f1=float(f1[seen].mean()) if n else 0.0,
        buckets=buckets(support, credited),
        prediction_shift_tv=float(0.5 * np.abs(support - predicted).sum() / n) if n else 0.0,
        top_confusions=top_confusions(label, pred, num_classes, num_confusions),
        classes_present=int(present.sum()),
        per_class=PerClass(support=support, correct=right, predicted=predicted, credited=credited),
    )
