"""Metrics of one split's predictions: accuracy, macro-F1, AUC-ROC, calibration error, log-loss, attribution.

    from crossmodal.evaluation.metrics import compute_metrics
    compute_metrics(y, proba, labels)    # {"n", "accuracy", "macro_f1", "roc_auc", "ece", "log_loss"}

A metric that is undefined (AUC when a class is missing from ``y``, anything on an empty split) is None.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15


def check_proba(y_true, proba, labels) -> tuple[np.ndarray, np.ndarray]:
    """``y_true`` as int64 class indices and ``proba`` as float64 rows that sum to 1; ValueError on a shape or
    class index that does not fit ``labels``."""
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    p = np.asarray(proba, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != len(labels):
        raise ValueError(f"proba must have shape (N, {len(labels)}) for labels {list(labels)}, got {p.shape}")
    if len(y) != len(p):
        raise ValueError(f"y_true has {len(y)} rows but proba has {len(p)}")
    if len(y) and (y.min() < 0 or y.max() >= len(labels)):
        raise ValueError(f"y_true holds class indices outside 0..{len(labels) - 1}")
    if len(p):
        # float32 softmax rows sum to 1 only to ~1e-7; renormalise so sklearn's checks and log-loss agree
        p = np.clip(p, 0.0, None)
        p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-300, None)
    return y, p


def expected_calibration_error(y: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE on the top-class confidence: sum over equal-width bins of (bin share) * |accuracy - confidence|."""
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y).astype(np.float64)
    idx = np.minimum((conf * bins).astype(np.int64), bins - 1)  # bins [k/B, (k+1)/B); conf 1.0 goes to the last
    ece = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            ece += m.mean() * abs(correct[m].mean() - conf[m].mean())
    return float(ece)


def roc_auc(y: np.ndarray, proba: np.ndarray) -> float | None:
    """Binary: AUC of the positive (index 1) column. Multi-class: one-vs-rest macro. None when undefined."""
    from sklearn.metrics import roc_auc_score

    n_classes = proba.shape[1]
    present = np.unique(y)
    if n_classes == 2:
        if len(present) < 2:
            return None
        return float(roc_auc_score(y, proba[:, 1]))
    if len(present) < n_classes:  # one-vs-rest needs a positive and a negative for every class
        return None
    try:
        return float(roc_auc_score(y, proba, multi_class="ovr", average="macro", labels=list(range(n_classes))))
    except ValueError:
        return None


def compute_metrics(y_true: np.ndarray, proba: np.ndarray, labels) -> dict:
    """accuracy, macro_f1, roc_auc (None when undefined), ece, log_loss and n for one split."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    y, p = check_proba(y_true, proba, labels)
    if len(y) == 0:
        return {"n": 0, "accuracy": None, "macro_f1": None, "roc_auc": None, "ece": None, "log_loss": None}
    pred = p.argmax(axis=1)
    return {
        "n": int(len(y)),
        "accuracy": float(accuracy_score(y, pred)),
        "macro_f1": float(f1_score(y, pred, average="macro", zero_division=0)),
        "roc_auc": roc_auc(y, p),
        "ece": expected_calibration_error(y, p),
        "log_loss": float(log_loss(y, np.clip(p, 1e-12, 1.0), labels=list(range(len(labels))))),
    }


def reliability_bins(y: np.ndarray, proba: np.ndarray, bins: int = ECE_BINS):
    """Per equal-width confidence bin: (mean confidence, accuracy, count); empty bins have count 0."""
    conf = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y).astype(np.float64)
    idx = np.minimum((conf * bins).astype(np.int64), bins - 1)
    count = np.bincount(idx, minlength=bins)
    mean_conf = np.bincount(idx, weights=conf, minlength=bins) / np.maximum(count, 1)
    accuracy = np.bincount(idx, weights=correct, minlength=bins) / np.maximum(count, 1)
    return mean_conf, accuracy, count


def attribution_summary(y: np.ndarray, proba: np.ndarray, labels, no_image: np.ndarray | None,
                        no_text: np.ndarray | None, gates: np.ndarray | None = None) -> dict | None:
    """Per true class and overall: mean drop of the predicted class's probability when the image (the text) is
    removed, and the mean gate weights when given. None when neither removal was predicted."""
    if no_image is None and no_text is None:
        return None
    y, p = np.asarray(y).astype(np.int64), np.asarray(proba, dtype=np.float64)
    rows = np.arange(len(y))
    pred = p.argmax(axis=1) if len(p) else np.zeros(0, dtype=np.int64)
    per_row = {}
    for key, other in (("image", no_image), ("text", no_text)):
        if other is not None:
            per_row[key] = p[rows, pred] - np.asarray(other, dtype=np.float64)[rows, pred]
    if gates is not None:
        g = np.asarray(gates, dtype=np.float64)
        per_row["gate_image"], per_row["gate_text"] = g[:, 0], g[:, 1]

    def summary(mask: np.ndarray) -> dict:
        out: dict = {"n": int(mask.sum())}
        for key, values in per_row.items():
            out[key] = float(values[mask].mean()) if mask.any() else None
        return out

    return {"grouped_by": "true label", "measure": "mean drop of the predicted class's probability",
            "per_class": {str(lab): summary(y == k) for k, lab in enumerate(labels)},
            "overall": summary(np.ones(len(y), dtype=bool))}
