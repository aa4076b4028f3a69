"""Evaluate trained heads: metrics, plots, per-class reports, and which head wins.

    from crossmodal.evaluate import evaluate_all, comparison_table
    metrics = evaluate_all("work/train", "reports")     # reads what crossmodal.train wrote
    print(comparison_table(metrics))

Writes under ``out_dir``:
    metrics.json                 {"heads": {HEAD: {"val", "test", "per_class", "modality", "family", "temperature",
                                 "ece", "ece_calibrated", "test_calibrated"}}, "labels", "best_fusion",
                                 "best_unimodal", "best_head", "best_traditional", "registered_head",
                                 "fusion_gain_macro_f1", "selection_metric": "macro_f1"}
                                 each head also has "missing_text", "missing_image" and "attribution"
    robustness.md                each head's test macro-F1 with both modalities, without text, without image
    plots/<head>_confusion.png   test confusion matrix (counts)
    plots/<head>_roc.png         test ROC curves (one per class when there are more than two)
    plots/<head>_reliability.png test reliability diagram before and after temperature scaling
    per_class/<head>.json        sklearn classification_report on test (precision, recall, f1, support)

``missing_text`` / ``missing_image`` are the ``test`` metrics recomputed with that modality removed from
every test row (null when the head's predictions.npz lacks them). ``attribution`` summarises, per true
class and overall, the mean leave-one-modality-out drop of the predicted class's probability (``image``:
p(full) - p(without image), ``text`` likewise; large = the prediction leaned on that modality) and, for
heads with gates, the mean gate weights ``gate_image`` / ``gate_text``.

Heads are *chosen* on validation macro-F1 (the test split is never used to pick a
winner); the fusion gain is *reported* on test. A metric that is undefined (AUC when a
class is missing from y_true, anything on an empty split) is ``None`` / JSON null.

Calibration: every head, deep or traditional, gets a temperature ``T`` fitted on its validation
probabilities (minimising the negative log-likelihood of ``softmax(log(p) / T)``); ``ece`` is the
test ECE as trained, ``ece_calibrated`` after scaling. Scaling never changes the argmax, so accuracy,
macro-F1 and the winner stay the same. The registered model applies its head's ``T``.

Families: "frozen" (heads on frozen features), "finetuned", "traditional" (scikit-learn baselines).
Winners (best_head, best_fusion, best_unimodal) are chosen among the deep heads; ``best_traditional``
names the best baseline; ``registered_head`` is the head the registry step logs: the best deep fusion
head (the best deep head when no fusion head was trained).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from crossmodal.plots import plot_confusion, plot_reliability, plot_roc  # noqa: F401  (re-exported)

ECE_BINS = 15
SELECTION_METRIC = "macro_f1"
TEMPERATURE_BOUNDS = (0.05, 20.0)  # log-space search range; T outside it means the probabilities are unusable
PROBA_EPS = 1e-12


def _check(y_true, proba, labels) -> tuple[np.ndarray, np.ndarray]:
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

    y, p = _check(y_true, proba, labels)
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


# ---------------------------------------------------------------- calibration


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p + 1e-12) / T)`` row-wise: T > 1 softens over-confident probabilities, T < 1 sharpens."""
    p = np.asarray(proba, dtype=np.float64)
    if p.size == 0:
        return p.astype(np.float32)
    z = np.log(p + PROBA_EPS) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def temperature_nll(y: np.ndarray, proba: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true class after temperature scaling."""
    y = np.asarray(y, dtype=np.int64)
    z = np.log(np.asarray(proba, dtype=np.float64) + PROBA_EPS) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(y)), y]).mean())


def fit_temperature(y: np.ndarray, proba: np.ndarray) -> float:
    """The T in TEMPERATURE_BOUNDS minimising validation NLL (bounded scalar search on log T); 1.0 without rows."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return 1.0
    lo, hi = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    res = minimize_scalar(lambda log_t: temperature_nll(y, proba, np.exp(log_t)), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-4})
    best = float(np.exp(res.x))
    # The NLL is convex in 1/T; still, never return a T that is worse than leaving the head alone.
    return best if temperature_nll(y, proba, best) <= temperature_nll(y, proba, 1.0) else 1.0


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


# ---------------------------------------------------------------- the stage


def _pick(heads: dict, names: list[str]) -> str | None:
    """Highest validation macro-F1; ties go to lower validation log-loss, then to the earlier name."""
    scored = [n for n in names if heads[n]["val"][SELECTION_METRIC] is not None]
    if not scored:
        return None
    return min(scored, key=lambda n: (-heads[n]["val"][SELECTION_METRIC], heads[n]["val"]["log_loss"], names.index(n)))


def evaluate_all(train_dir, out_dir) -> dict:
    """Evaluate every head under ``train_dir`` (as written by ``crossmodal.train.train_all``)."""
    from sklearn.metrics import classification_report

    from crossmodal.config import HEAD_NAMES

    train_dir, out_dir = Path(train_dir), Path(out_dir)
    labels_path = train_dir / "labels.json"
    if not labels_path.is_file():
        raise FileNotFoundError(f"{labels_path} not found; run `crossmodal train` first")
    labels = json.loads(labels_path.read_text())
    found = [p.parent.name for p in train_dir.glob("*/head.json") if (p.parent / "predictions.npz").is_file()]
    order = {name: i for i, name in enumerate(HEAD_NAMES)}
    names = sorted(found, key=lambda n: (order.get(n, len(order)), n))
    if not names:
        raise FileNotFoundError(f"no trained heads (head.json + predictions.npz) under {train_dir}")

    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    (out_dir / "per_class").mkdir(parents=True, exist_ok=True)
    heads: dict[str, dict] = {}
    for name in names:
        meta = json.loads((train_dir / name / "head.json").read_text())
        with np.load(train_dir / name / "predictions.npz", allow_pickle=False) as npz:
            pred = {k: npz[k] for k in npz.files}
        val = compute_metrics(pred["val_y"], pred["val_proba"], labels)
        test = compute_metrics(pred["test_y"], pred["test_proba"], labels)
        y_test, p_test = pred["test_y"].astype(np.int64), pred["test_proba"].astype(np.float64)
        per_class = {}
        if len(y_test):
            per_class = classification_report(
                y_test,
                p_test.argmax(axis=1),
                labels=list(range(len(labels))),
                target_names=[str(x) for x in labels],
                output_dict=True,
                zero_division=0,
            )
        (out_dir / "per_class" / f"{name}.json").write_text(json.dumps(per_class, indent=2))
        plots = out_dir / "plots"
        plot_confusion(y_test, p_test, labels, f"{name}: test confusion matrix", plots / f"{name}_confusion.png")
        plot_roc(y_test, p_test, labels, f"{name}: test ROC", plots / f"{name}_roc.png")
        temperature = fit_temperature(pred["val_y"], _check(pred["val_y"], pred["val_proba"], labels)[1])
        test_cal = compute_metrics(y_test, apply_temperature(p_test, temperature), labels)
        plot_reliability(y_test, p_test, apply_temperature(p_test, temperature), temperature,
                         f"{name}: test reliability", plots / f"{name}_reliability.png")
        heads[name] = {"modality": meta.get("modality", "fusion"), "family": meta.get("family", "frozen"),
                       "val": val, "test": test, "per_class": per_class, "temperature": temperature,
                       "ece": test["ece"], "ece_calibrated": test_cal["ece"], "test_calibrated": test_cal}
        # Robustness: the same test rows with one modality removed (absent keys: not available for this head).
        for block, key in (("missing_text", "test_proba_missing_text"), ("missing_image", "test_proba_missing_image")):
            heads[name][block] = compute_metrics(pred["test_y"], pred[key], labels) if key in pred else None
        heads[name]["attribution"] = attribution_summary(
            y_test, p_test, labels, pred.get("test_proba_missing_image"), pred.get("test_proba_missing_text"),
            pred.get("test_gate"))

    deep = [n for n in names if heads[n]["family"] != "traditional"]
    fusion = [n for n in deep if heads[n]["modality"] == "fusion"]
    unimodal = [n for n in deep if heads[n]["modality"] in ("image", "text")]
    best_fusion, best_unimodal = _pick(heads, fusion), _pick(heads, unimodal)
    gain = None
    if best_fusion and best_unimodal:
        f, u = heads[best_fusion]["test"]["macro_f1"], heads[best_unimodal]["test"]["macro_f1"]
        gain = None if f is None or u is None else float(f - u)
    metrics = {
        "heads": heads,
        "labels": labels,
        "best_fusion": best_fusion,
        "best_unimodal": best_unimodal,
        "best_head": _pick(heads, deep),
        "best_traditional": _pick(heads, [n for n in names if heads[n]["family"] == "traditional"]),
        "registered_head": best_fusion or _pick(heads, deep),
        "fusion_gain_macro_f1": gain,
        "selection_metric": SELECTION_METRIC,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False))
    (out_dir / "robustness.md").write_text(robustness_table(metrics) + "\n")
    return metrics


def robustness_table(metrics: dict) -> str:
    """Markdown table: each head's test macro-F1 with both modalities, without text and without image."""

    def f1(block):
        return None if not block else block.get("macro_f1")

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = ["| head | kind | macro-F1 full | without text | without image |", "|---|---|---:|---:|---:|"]
    for name, m in metrics["heads"].items():
        kind = "fusion" if m.get("modality") == "fusion" else "unimodal"
        cells = [fmt(f1(m.get("test"))), fmt(f1(m.get("missing_text"))), fmt(f1(m.get("missing_image")))]
        lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(metrics: dict) -> str:
    """Fixed-width table of test metrics, best test macro-F1 first, and the fusion-gain line.

    ``family`` (traditional / frozen / finetuned) and ``kind`` (fusion / unimodal) put baselines and deep heads,
    unimodal and fused, side by side; ``ECE cal`` is the test ECE after temperature scaling.
    """

    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    heads = metrics["heads"]
    def test_f1(name):
        f1 = heads[name]["test"]["macro_f1"]
        return -1.0 if f1 is None else f1

    rows = sorted(heads, key=test_f1, reverse=True)  # stable: ties keep the registry order
    width = max([len("head")] + [len(n) for n in rows])
    header = (f"{'head':<{width}}  {'family':<11}  {'kind':<8}  {'accuracy':>8}  {'macro-F1':>8}  {'AUC-ROC':>8}  "
              f"{'ECE':>8}  {'ECE-cal':>8}")
    lines = [header]
    lines.append("-" * len(lines[0]))
    for n in rows:
        t = heads[n]["test"]
        kind = "fusion" if heads[n]["modality"] == "fusion" else "unimodal"
        family = heads[n].get("family", "frozen")
        cells = [fmt(t["accuracy"]), fmt(t["macro_f1"]), fmt(t["roc_auc"]), fmt(t.get("ece")),
                 fmt(heads[n].get("ece_calibrated"))]
        lines.append(f"{n:<{width}}  {family:<11}  {kind:<8}  " + "  ".join(f"{c:>8}" for c in cells))
    fusion, unimodal, gain = metrics.get("best_fusion"), metrics.get("best_unimodal"), metrics.get("fusion_gain_macro_f1")
    if fusion and unimodal and gain is not None:
        verb = "beats" if gain >= 0 else "trails"
        points = f"{100 * gain:+.1f}"
        lines.append(f"best fusion {fusion} {verb} best unimodal {unimodal} by {points} macro-F1 points (test)")
    else:
        lines.append("fusion gain: n/a (needs at least one fusion head and one unimodal head with test rows)")
    return "\n".join(lines)
