"""Evaluate trained heads: metrics, calibration, plots, per-class reports, and which head wins.

    from crossmodal.evaluation.evaluate import evaluate_all
    from crossmodal.evaluation.tables import comparison_table
    metrics = evaluate_all("work/models", "reports")     # reads what crossmodal.training.train wrote
    print(comparison_table(metrics))

Writes under ``out_dir`` (names in ``crossmodal.artifacts``):
    metrics.json                 {"heads": {HEAD: {"val", "test", "test_calibrated", "per_class", "modality", "family",
                                 "temperature", "ece", "ece_calibrated", "missing_text", "missing_image",
                                 "attribution"}}, "labels", "best_fusion", "best_unimodal", "best_head",
                                 "best_traditional", "registered_head", "fusion_gain_macro_f1",
                                 "fusion_gain_over_linear_probe", "fusion_gain_interval", "selection_metric"}
    robustness.md                each head's test macro-F1 with both modalities, without text, without image
    plots/<head>_confusion.png, <head>_roc.png, <head>_reliability.png   test confusion, ROC, reliability
    per_class/<head>.json        sklearn classification_report on test

Winners are chosen on validation macro-F1 among the deep heads, never on test; the fusion gain is reported on
test. ``registered_head`` is the ``ensemble`` when it was trained, else the best deep fusion head (the best deep
head when no fusion head was trained); the baselines (family "traditional", and ``linear_probe``, family
"baseline") are compared, never registered. ``fusion_gain_over_linear_probe`` is the registered fusion head's test
macro-F1 minus the linear probe's: what the deep heads add over a logistic regression on the same features.
``fusion_gain_interval`` says how far each gain can be trusted: ``{"over_unimodal", "over_linear_probe"}``, each the
paired bootstrap of ``crossmodal.evaluation.comparison`` on the test rows (``delta``, its 95 % ``ci_low`` and
``ci_high``, ``n_rows``), or null where the gain is. On a few hundred test rows with small classes, one class's
F1 moves the macro average by several points, so a gain whose interval spans zero is not a win.
Every head gets a temperature fitted on validation and kept only when the cross-fitted guard of
``crossmodal.evaluation.calibration`` accepts it (``calibration`` records why; never for the ensemble, whose
members were chosen on those rows); it keeps the argmax, so accuracy,
macro-F1 and the winner are unchanged.
``missing_*`` and ``attribution`` are null when the head's predictions lack the rows with a modality removed; an
undefined metric (AUC with a class missing, anything on an empty split) is null.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from crossmodal.artifacts import (
    HEAD_FILE,
    LABELS_FILE,
    METRICS_FILE,
    PER_CLASS_DIR,
    PLOTS_DIR,
    PREDICTIONS_FILE,
    ROBUSTNESS_FILE,
)
from crossmodal.evaluation.calibration import apply_temperature, guarded_temperature
from crossmodal.evaluation.comparison import paired_bootstrap
from crossmodal.evaluation.metrics import attribution_summary, check_proba, compute_metrics
from crossmodal.evaluation.plots import plot_confusion, plot_reliability, plot_roc
from crossmodal.evaluation.tables import robustness_table

SELECTION_METRIC = "macro_f1"
GAIN_RESAMPLES = 2000
GAIN_INTERVAL_KEYS = ("delta", "ci_low", "ci_high", "confidence", "n_rows", "resamples")


def _pick(heads: dict, names: list[str]) -> str | None:
    """Highest validation macro-F1; ties go to lower validation log-loss, then to the earlier name."""
    scored = [n for n in names if heads[n]["val"][SELECTION_METRIC] is not None]
    if not scored:
        return None
    return min(scored, key=lambda n: (-heads[n]["val"][SELECTION_METRIC], heads[n]["val"]["log_loss"], names.index(n)))


def evaluate_all(train_dir, out_dir) -> dict:
    """Evaluate every head under ``train_dir`` (as written by ``crossmodal.training.train.train_all``)."""
    from sklearn.metrics import classification_report

    from crossmodal.config import HEAD_NAMES

    train_dir, out_dir = Path(train_dir), Path(out_dir)
    labels_path = train_dir / LABELS_FILE
    if not labels_path.is_file():
        raise FileNotFoundError(f"{labels_path} not found; run `crossmodal train` first")
    labels = json.loads(labels_path.read_text())
    found = [p.parent.name for p in train_dir.glob("*/head.json") if (p.parent / PREDICTIONS_FILE).is_file()]
    order = {name: i for i, name in enumerate(HEAD_NAMES)}
    names = sorted(found, key=lambda n: (order.get(n, len(order)), n))
    if not names:
        raise FileNotFoundError(f"no trained heads (head.json + predictions.npz) under {train_dir}")

    (out_dir / PLOTS_DIR).mkdir(parents=True, exist_ok=True)
    (out_dir / PER_CLASS_DIR).mkdir(parents=True, exist_ok=True)
    heads: dict[str, dict] = {}
    tested: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # head: (test ids, y, proba), for the gains
    for name in names:
        meta = json.loads((train_dir / name / HEAD_FILE).read_text())
        with np.load(train_dir / name / PREDICTIONS_FILE, allow_pickle=False) as npz:
            pred = {k: npz[k] for k in npz.files}
        val = compute_metrics(pred["val_y"], pred["val_proba"], labels)
        test = compute_metrics(pred["test_y"], pred["test_proba"], labels)
        y_test, p_test = pred["test_y"].astype(np.int64), pred["test_proba"].astype(np.float64)
        tested[name] = (pred["test_ids"].astype(str), y_test, p_test)
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
        (out_dir / PER_CLASS_DIR / f"{name}.json").write_text(json.dumps(per_class, indent=2))
        plots = out_dir / PLOTS_DIR
        plot_confusion(y_test, p_test, labels, f"{name}: test confusion matrix", plots / f"{name}_confusion.png")
        plot_roc(y_test, p_test, labels, f"{name}: test ROC", plots / f"{name}_roc.png")
        is_ensemble = meta.get("family") == "ensemble"
        # Greedy weights were fitted to these validation rows, so a T fitted on them is in-sample; within_se
        # fits no weights (its members count once each), and the split-half guard judges its T like any head's.
        # An ensemble saved before the selection was recorded is a greedy one.
        weights_fitted = is_ensemble and meta["history"][-1].get("selection", "greedy") == "greedy"
        guard = guarded_temperature(pred["val_y"], check_proba(pred["val_y"], pred["val_proba"], labels)[1],
                                    in_sample=weights_fitted)
        temperature = guard["temperature"]
        test_cal = compute_metrics(y_test, apply_temperature(p_test, temperature), labels)
        plot_reliability(y_test, p_test, apply_temperature(p_test, temperature), temperature,
                         f"{name}: test reliability", plots / f"{name}_reliability.png")
        heads[name] = {"modality": meta.get("modality", "fusion"), "family": meta.get("family", "frozen"),
                       "val": val, "test": test, "per_class": per_class, "temperature": temperature,
                       "ece": test["ece"], "ece_calibrated": test_cal["ece"], "test_calibrated": test_cal,
                       "calibration": guard}
        for key in ("variant", "image_features", "projection"):  # what a traditional baseline was built from
            if key in meta:
                heads[name][key] = meta[key]
        if is_ensemble:
            heads[name]["members"] = meta["history"][-1].get("members")
            if "candidates" in meta["history"][-1]:  # within_se: each candidate's gap to the best and its SE
                heads[name]["selection"] = meta["history"][-1]["candidates"]
        if "processes" in meta:  # the fine-tuned head: how many data-parallel processes trained it
            heads[name]["processes"] = meta["processes"]
        # Robustness: the same test rows with one modality removed (absent keys: not available for this head).
        for block, key in (("missing_text", "test_proba_missing_text"), ("missing_image", "test_proba_missing_image")):
            heads[name][block] = compute_metrics(pred["test_y"], pred[key], labels) if key in pred else None
        heads[name]["attribution"] = attribution_summary(
            y_test, p_test, labels, pred.get("test_proba_missing_image"), pred.get("test_proba_missing_text"),
            pred.get("test_gate"))

    deep = [n for n in names if heads[n]["family"] not in ("traditional", "baseline")]
    fusion = [n for n in deep if heads[n]["modality"] == "fusion"]
    unimodal = [n for n in deep if heads[n]["modality"] in ("image", "text")]
    # The ensemble's weights were chosen on validation, so its validation score flatters it: it is not ranked
    # against the other heads there. When trained it is the registered (and best) fusion head: averaging heads
    # chosen with replacement is what holds up on new rows, where one small validation split picks noisily.
    ensemble = next((n for n in fusion if heads[n]["family"] == "ensemble"), None)
    best_fusion = ensemble or _pick(heads, fusion)
    best_unimodal = _pick(heads, unimodal)

    def test_gain(a, b):
        if not a or not b:
            return None
        f, u = heads[a]["test"]["macro_f1"], heads[b]["test"]["macro_f1"]
        return None if f is None or u is None else float(f - u)

    def gain_interval(a, b):
        """Paired bootstrap of test macro-F1 of ``a`` minus ``b``; None where the gain is undefined or the two
        were scored on other rows."""
        if test_gain(a, b) is None:
            return None
        (ids_a, y, proba_a), (ids_b, _, proba_b) = tested[a], tested[b]
        if not np.array_equal(ids_a, ids_b):
            return None
        stats = paired_bootstrap(y, proba_b, proba_a, labels, SELECTION_METRIC, GAIN_RESAMPLES)
        return {k: stats[k] for k in GAIN_INTERVAL_KEYS}

    probe = "linear_probe" if "linear_probe" in heads else None
    metrics = {
        "heads": heads,
        "labels": labels,
        "best_fusion": best_fusion,
        "best_unimodal": best_unimodal,
        "best_head": ensemble or _pick(heads, deep),
        "best_traditional": _pick(heads, [n for n in names if heads[n]["family"] == "traditional"]),
        "registered_head": best_fusion or _pick(heads, deep),
        "fusion_gain_macro_f1": test_gain(best_fusion, best_unimodal),
        "fusion_gain_over_linear_probe": test_gain(best_fusion, probe),
        "fusion_gain_interval": {"over_unimodal": gain_interval(best_fusion, best_unimodal),
                                 "over_linear_probe": gain_interval(best_fusion, probe)},
        "selection_metric": SELECTION_METRIC,
    }
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, allow_nan=False))
    (out_dir / ROBUSTNESS_FILE).write_text(robustness_table(metrics) + "\n")
    return metrics
