"""Metrics of both bundles: binary classification (the M2UNet paper's Table II, the DA-CMIL paper's Table 1) and
lobe overlap (the M2UNet paper's Table III); the ROC plot is :func:`chestct.writers.save_roc_png`.

He et al., arXiv 2005.03832: Table II reports accuracy, precision, recall, F1 and AUC of severe (1) against
non-severe (0); Table III reports, per lobe and as their mean, the Dice similarity coefficient (DSC), sensitivity
(SEN, voxel recall) and positive predictive value (PPV, voxel precision). Everything here is plain numpy (AUC by the
Mann-Whitney statistic, ties counted one half), so it runs in any process without a metric framework.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from chestct.constants import LOBE_NAMES

__all__ = [
    "LOBE_METRICS",
    "binary_metrics",
    "lobe_overlap",
    "mean_lobe_metrics",
    "roc_auc",
    "roc_curve",
]

# Table III columns, per lobe and mean.
LOBE_METRICS = ("dsc", "sensitivity", "ppv")


def _ratio(a: float, b: float) -> float:
    return float(a / b) if b > 0 else float("nan")


def roc_auc(probabilities: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve of the class-1 probability (NaN when one class is absent).

    Args:
        probabilities: predicted probability of class 1 per case, shape (num_cases,).
        labels: true labels 0/1, shape (num_cases,).
    """
    p = np.asarray(probabilities, dtype=float).reshape(-1)
    y = np.asarray(labels, dtype=int).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"got {p.size} probabilities for {y.size} labels.")
    pos, neg = p[y == 1], p[y == 0]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def binary_metrics(
    probabilities: Sequence[float], labels: Sequence[int], threshold: float = 0.5
) -> dict[str, float]:
    """Table II of the paper (severe = positive class 1) plus specificity and the confusion counts.

    Args:
        probabilities: probability of severe per case, shape (num_cases,).
        labels: true labels (0 non-severe, 1 severe).
        threshold: a case is predicted severe when its probability is ``>= threshold``.

    Returns:
        flat ``{name: float}``: ``accuracy``, ``precision``, ``recall``, ``f1``, ``auc``, ``specificity``, ``tp``,
        ``fp``, ``tn``, ``fn``, ``num_cases``; undefined ratios are NaN.
    """
    if not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}.")
    p = np.asarray(probabilities, dtype=float).reshape(-1)
    y = np.asarray(labels, dtype=int).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"got {p.size} probabilities for {y.size} labels.")
    pred = (p >= threshold).astype(int)
    tp = int(((pred == 1) & (y == 1)).sum())
    tn = int(((pred == 0) & (y == 0)).sum())
    fp = int(((pred == 1) & (y == 0)).sum())
    fn = int(((pred == 0) & (y == 1)).sum())
    return {
        "accuracy": _ratio(tp + tn, y.size),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "auc": roc_auc(p, y),
        "specificity": _ratio(tn, tn + fp),
        "tp": float(tp),
        "fp": float(fp),
        "tn": float(tn),
        "fn": float(fn),
        "num_cases": float(y.size),
    }


def lobe_overlap(
    prediction: np.ndarray, truth: np.ndarray, names: Mapping[int, str] = LOBE_NAMES
) -> dict[str, float]:
    """DSC, sensitivity and PPV of each lobe of one scan (Table III), and their means over the lobes.

    Args:
        prediction: predicted lobe labels, any shape (e.g. (X, Y, Z)).
        truth: true lobe labels, same shape; voxels < 0 (unannotated) are left out.
        names: label value -> lobe name.

    Returns:
        ``{"<lobe>_dsc", "<lobe>_sensitivity", "<lobe>_ppv"}`` for every lobe and ``mean_dsc``,
        ``mean_sensitivity``, ``mean_ppv`` (means over the lobes where the value is defined). A lobe absent from
        both gives NaN (it does not enter the means); absent from one only gives 0.
    """
    pred = np.asarray(prediction)
    true = np.asarray(truth)
    if pred.shape != true.shape:
        raise ValueError(f"prediction shape {list(pred.shape)} differs from truth shape {list(true.shape)}.")
    valid = true >= 0
    out: dict[str, float] = {}
    for value, name in names.items():
        p = (pred == value) & valid
        t = (true == value) & valid
        inter = float(np.logical_and(p, t).sum())
        ps, ts = float(p.sum()), float(t.sum())
        out[f"{name}_dsc"] = _ratio(2.0 * inter, ps + ts)
        out[f"{name}_sensitivity"] = _ratio(inter, ts)
        out[f"{name}_ppv"] = _ratio(inter, ps) if ts > 0 or ps > 0 else float("nan")
        if ts > 0 and ps == 0:
            out[f"{name}_ppv"] = 0.0
    for metric in LOBE_METRICS:
        values = [out[f"{name}_{metric}"] for name in names.values()]
        finite = [v for v in values if np.isfinite(v)]
        out[f"mean_{metric}"] = float(np.mean(finite)) if finite else float("nan")
    return out


def mean_lobe_metrics(per_case: Sequence[Mapping[str, float]], prefix: str = "lobe_") -> dict[str, float]:
    """Mean of :func:`lobe_overlap` over scans (NaNs ignored), keys prefixed by ``prefix``, plus the scan count."""
    if not per_case:
        return {}
    out = {}
    for key in per_case[0]:
        values = np.asarray([c[key] for c in per_case], dtype=float)
        finite = values[np.isfinite(values)]
        out[prefix + key] = float(finite.mean()) if finite.size else float("nan")
    out[prefix + "num_cases"] = float(len(per_case))
    return out


def roc_curve(probabilities: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """False and true positive rates at every distinct threshold, from (0, 0) to (1, 1)."""
    p = np.asarray(probabilities, dtype=float).reshape(-1)
    y = np.asarray(labels, dtype=int).reshape(-1)
    order = np.argsort(-p, kind="mergesort")
    p, y = p[order], y[order]
    distinct = np.r_[np.flatnonzero(np.diff(p)), y.size - 1]
    tps = np.cumsum(y)[distinct]
    fps = (distinct + 1) - tps
    pos, neg = max(int(y.sum()), 1), max(int(y.size - y.sum()), 1)
    return np.r_[0.0, fps / neg], np.r_[0.0, tps / pos]
