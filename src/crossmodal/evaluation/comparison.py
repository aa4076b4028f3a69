"""Paired comparison of two classifiers scored on the same rows: a seeded paired bootstrap percentile interval of the
difference of one metric, and an exact McNemar test on per-row correctness. Pure numpy/scipy, no MLflow.

    import numpy as np
    from crossmodal.evaluation.comparison import mcnemar_exact, paired_bootstrap
    y = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    champion = np.eye(2)[[0, 1, 1, 1, 0, 0, 0, 0]]           # (N, C) probabilities of the baseline model "a"
    challenger = np.eye(2)[[0, 1, 0, 1, 1, 0, 0, 0]]         # ... and of the model "b" tried against it
    out = paired_bootstrap(y, champion, challenger, ["no", "yes"], "macro_f1", resamples=500, seed=0)
    out["delta"], out["ci_low"], out["ci_high"]              # b minus a, and its 95 % percentile interval
    mcnemar_exact(champion.argmax(1) == y, challenger.argmax(1) == y)   # two-sided p-value: 0.5 here

The bootstrap draws each resample's rows once and scores both models on them (paired: what varies is the rows,
not the models), so the interval reflects how much the difference depends on which rows happen to be there.
Everything is vectorised over resamples: macro-F1 from per-resample confusion counts (one ``bincount``), AUC from
per-resample counts of positives and negatives per tie group of scores (one ``bincount`` per class); memory stays
bounded by drawing the resamples in blocks.
Metric definitions match :func:`crossmodal.evaluation.metrics.compute_metrics` (macro-F1 over the classes present
in the truth or the predictions; AUC one-vs-rest macro, or the positive column for two classes; undefined when a
class is absent from the truth): a resample where the metric is undefined is left out of the interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from crossmodal.evaluation.metrics import check_proba

METRICS = ("accuracy", "macro_f1", "roc_auc")
# Resample x row indices drawn at a time (32 MiB of int64): memory stays bounded whatever the number of rows.
_BLOCK = 1 << 22


def _accuracy(y_idx: np.ndarray, pred_idx: np.ndarray) -> np.ndarray:
    return (y_idx == pred_idx).mean(axis=1)


def _macro_f1(y_idx: np.ndarray, pred_idx: np.ndarray, n_classes: int) -> np.ndarray:
    """Macro-F1 of each resample (row of ``y_idx``), from its confusion counts, all resamples in one bincount."""
    k = y_idx.shape[0]
    cells = n_classes * n_classes
    keys = (np.arange(k, dtype=np.int64) * cells)[:, None] + y_idx * n_classes + pred_idx
    counts = np.bincount(keys.ravel(), minlength=k * cells).reshape(k, n_classes, n_classes)
    tp = np.diagonal(counts, axis1=1, axis2=2).astype(np.float64)
    denom = counts.sum(axis=2) + counts.sum(axis=1)  # 2 tp + fp + fn per class
    present = denom > 0  # sklearn averages over the classes in y_true or y_pred
    f1 = np.where(present, 2.0 * tp / np.maximum(denom, 1), 0.0)
    return f1.sum(axis=1) / np.maximum(present.sum(axis=1), 1)


class _Auc:
    """AUC of one score column against ``positive`` rows, for many resamples at once. Each row is coded once by its
    tie group (rows of equal score, in score order) and its class, so one ``bincount`` gives every resample's
    positives and negatives per tie group; ties count one half, as in ``sklearn.metrics.roc_auc_score``."""

    def __init__(self, scores: np.ndarray, positive: np.ndarray):
        order = np.argsort(scores, kind="stable")
        ordered = scores[order]
        group_in_order = np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1
        self.groups = int(group_in_order[-1]) + 1
        group = np.empty(len(scores), dtype=np.int64)
        group[order] = group_in_order
        self.code = group * 2 + (~positive).astype(np.int64)

    def __call__(self, idx: np.ndarray) -> np.ndarray:
        k, cells = idx.shape[0], 2 * self.groups
        keys = (np.arange(k, dtype=np.int64) * cells)[:, None] + self.code[idx]
        counts = np.bincount(keys.ravel(), minlength=k * cells).reshape(k, self.groups, 2)
        pos, neg = counts[..., 0], counts[..., 1]
        below = np.cumsum(neg, axis=1) - neg  # negatives scored strictly lower than each tie group
        n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
        twice = (pos * (2 * below + neg)).sum(axis=1)  # integers: exact
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where((n_pos > 0) & (n_neg > 0), twice / (2.0 * n_pos * n_neg), np.nan)


def _auc_scorers(y: np.ndarray, proba: np.ndarray) -> list[_Auc]:
    if proba.shape[1] == 2:
        return [_Auc(proba[:, 1], y == 1)]
    return [_Auc(proba[:, j], y == j) for j in range(proba.shape[1])]


def _scores(metric: str, y: np.ndarray, pred: np.ndarray, auc: list[_Auc] | None, idx: np.ndarray,
            n_classes: int) -> np.ndarray:
    """The metric of one model on each resample; ``idx`` (k, n) holds each resample's row indices."""
    if metric == "accuracy":
        return _accuracy(y[idx], pred[idx])
    if metric == "macro_f1":
        return _macro_f1(y[idx], pred[idx], n_classes)
    # One-vs-rest macro: undefined (NaN) in a resample where any class lacks a positive or a negative row.
    return np.mean([scorer(idx) for scorer in auc], axis=0)


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None


def paired_bootstrap(y, proba_a, proba_b, labels: Sequence[str], metric: str, resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """Difference ``metric(b) - metric(a)`` of two models' probabilities on the same rows, with a paired bootstrap
    percentile interval.

    ``y``: class indices into ``labels``; ``proba_a``, ``proba_b``: (N, C) probabilities in ``labels`` order.
    Returns ``{"metric", "n_rows", "score_a", "score_b", "delta", "ci_low", "ci_high", "confidence", "resamples",
    "resamples_used", "seed"}``; a score, the delta or the interval is None where the metric is undefined on these
    rows (AUC with a class absent). The same ``seed`` gives the same interval.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {list(METRICS)}, got {metric!r}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    y, pa = check_proba(y, proba_a, labels)
    _, pb = check_proba(y, proba_b, labels)
    if len(pa) != len(pb):
        raise ValueError(f"proba_a has {len(pa)} rows but proba_b has {len(pb)}")
    n, n_classes = len(y), len(labels)
    if n == 0:
        raise ValueError("no rows to compare")
    pred_a, pred_b = pa.argmax(axis=1), pb.argmax(axis=1)
    auc_a = _auc_scorers(y, pa) if metric == "roc_auc" else None
    auc_b = _auc_scorers(y, pb) if metric == "roc_auc" else None

    identity = np.arange(n)[None, :]
    score_a = _scores(metric, y, pred_a, auc_a, identity, n_classes)[0]
    score_b = _scores(metric, y, pred_b, auc_b, identity, n_classes)[0]

    rng = np.random.default_rng(seed)
    per_block = max(1, _BLOCK // n)
    deltas = []
    for start in range(0, resamples, per_block):
        idx = rng.integers(0, n, size=(min(per_block, resamples - start), n))
        deltas.append(_scores(metric, y, pred_b, auc_b, idx, n_classes)
                      - _scores(metric, y, pred_a, auc_a, idx, n_classes))
    delta_samples = np.concatenate(deltas)
    delta_samples = delta_samples[np.isfinite(delta_samples)]
    tail = (1.0 - confidence) / 2.0
    if len(delta_samples) and np.isfinite(score_a) and np.isfinite(score_b):
        low, high = np.quantile(delta_samples, [tail, 1.0 - tail])
        ci_low, ci_high = float(low), float(high)
    else:
        ci_low = ci_high = None
    delta = float(score_b - score_a) if np.isfinite(score_a) and np.isfinite(score_b) else None
    return {"metric": metric, "n_rows": int(n), "score_a": _finite(score_a), "score_b": _finite(score_b),
            "delta": delta, "ci_low": ci_low, "ci_high": ci_high, "confidence": float(confidence),
            "resamples": int(resamples), "resamples_used": int(len(delta_samples)), "seed": int(seed)}


def mcnemar_exact(correct_a, correct_b) -> float:
    """Two-sided exact McNemar p-value: are the rows only ``a`` gets right as common as those only ``b`` gets right?

    A binomial test of one kind of discordant pair among all of them (p = 0.5 under the null); 1.0 when the two
    models are right and wrong on exactly the same rows.
    """
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"correct_a has shape {a.shape} but correct_b has {b.shape}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    if only_a + only_b == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(only_b, only_a + only_b, 0.5).pvalue)
