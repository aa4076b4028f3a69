"""Evaluation: metrics against hand-computed values, undefined AUC, and evaluate_all's files."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from crossmodal.config import TrainConfig
from crossmodal.evaluation.evaluate import evaluate_all
from crossmodal.evaluation.metrics import compute_metrics
from crossmodal.evaluation.tables import comparison_table
from crossmodal.heads.registry import HEADS
from crossmodal.training.train import train_all

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_binary_metrics_match_hand_computed_values():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.9])
    m = compute_metrics(y, np.stack([1 - p1, p1], 1), ["neg", "pos"])
    # predictions 0,1,0,1: one hit per class -> precision = recall = F1 = 0.5 for both classes
    assert m["accuracy"] == pytest.approx(0.5)
    assert m["macro_f1"] == pytest.approx(0.5)
    # positive scores {0.4, 0.9} vs negative {0.1, 0.6}: 3 of 4 pairs ranked right
    assert m["roc_auc"] == pytest.approx(0.75)
    # confidences 0.9 (right), 0.6 (wrong), 0.6 (wrong), 0.9 (right): two bins, |1-.9|*.5 + |0-.6|*.5
    assert m["ece"] == pytest.approx(0.35)
    assert m["n"] == 4
    assert m["log_loss"] == pytest.approx(-np.mean(np.log([0.9, 0.4, 0.4, 0.9])))


def test_three_class_metrics_match_hand_computed_values():
    y = np.array([0, 1, 2, 0, 1, 2])
    proba = np.array(
        [[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6], [0.3, 0.4, 0.3], [0.1, 0.8, 0.1], [0.5, 0.2, 0.3]]
    )
    m = compute_metrics(y, proba, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(4 / 6)  # predictions 0,1,2,1,1,0
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)  # per-class F1: a .5, b .8, c 2/3
    # one-vs-rest AUC: a 7/8, b 8/8, c 7/8 (0.3 ties with two negatives count half each)
    assert m["roc_auc"] == pytest.approx((7 / 8 + 1 + 7 / 8) / 3)
    # bins: .7 right, .5 right + .5 wrong (acc .5 = conf .5), .6 right, .4 wrong, .8 right
    assert m["ece"] == pytest.approx((0.3 + 0 + 0.4 + 0.4 + 0.2) / 6)


def test_roc_auc_is_none_when_undefined():
    proba2 = np.array([[0.8, 0.2], [0.3, 0.7]])
    assert compute_metrics(np.array([0, 0]), proba2, ["x", "y"])["roc_auc"] is None  # single class in y_true
    proba3 = np.array([[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.4, 0.1]])
    m = compute_metrics(np.array([0, 1, 0]), proba3, ["a", "b", "c"])  # class c absent
    assert m["roc_auc"] is None
    assert m["accuracy"] == pytest.approx(1.0)
    assert "null" in json.dumps(m)
    empty = compute_metrics(np.array([], dtype=int), np.zeros((0, 3)), ["a", "b", "c"])
    assert empty["n"] == 0 and empty["macro_f1"] is None


def test_compute_metrics_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match=r"shape \(N, 3\)"):
        compute_metrics(np.array([0, 1]), np.zeros((2, 2)), ["a", "b", "c"])
    with pytest.raises(ValueError, match="2 rows but proba has 3"):
        compute_metrics(np.array([0, 1]), np.full((3, 2), 0.5), ["a", "b"])
    with pytest.raises(ValueError, match="outside 0..1"):
        compute_metrics(np.array([0, 2]), np.full((2, 2), 0.5), ["a", "b"])


def _head_metrics(modality, val_f1, test_f1, auc=0.9):
    def split(f1):
        return {"n": 10, "accuracy": f1, "macro_f1": f1, "roc_auc": auc, "ece": 0.1, "log_loss": 0.5}

    return {"modality": modality, "val": split(val_f1), "test": split(test_f1), "per_class": {}}


def test_comparison_table_rows_and_gain_line():
    metrics = {
        "heads": {
            "text_only": _head_metrics("text", 0.70, 0.712),
            "concat": _head_metrics("fusion", 0.80, 0.835, auc=None),
            "image_only": _head_metrics("image", 0.50, 0.55),
        },
        "best_fusion": "concat",
        "best_unimodal": "text_only",
        "fusion_gain_macro_f1": 0.835 - 0.712,
    }
    table = comparison_table(metrics)
    lines = table.splitlines()
    assert lines[0].split() == ["head", "family", "kind", "accuracy", "macro-F1", "AUC-ROC", "ECE", "ECE-cal"]
    assert [line.split()[0] for line in lines[2:5]] == ["concat", "text_only", "image_only"]
    assert lines[2].split()[:6] == ["concat", "frozen", "fusion", "0.835", "0.835", "n/a"]
    assert lines[3].split()[2] == "unimodal"
    assert len({len(line) for line in lines[2:5]}) == 1  # fixed width
    assert lines[-1] == "best fusion concat beats best unimodal text_only by +12.3 macro-F1 points (test)"
    metrics["fusion_gain_macro_f1"] = -0.05
    last = comparison_table(metrics).splitlines()[-1]
    assert last == "best fusion concat trails best unimodal text_only by -5.0 macro-F1 points (test)"
    metrics.update(best_unimodal=None, fusion_gain_macro_f1=None)
    assert "n/a" in comparison_table(metrics).splitlines()[-1]
    metrics["heads"]["traditional_text"] = {**_head_metrics("text", 0.6, 0.6), "family": "traditional",
                                            "ece_calibrated": 0.042}
    row = next(line for line in comparison_table(metrics).splitlines() if line.startswith("traditional_text"))
    assert row.split() == ["traditional_text", "traditional", "unimodal", "0.600", "0.600", "0.900", "0.100", "0.042"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small train_all output: 3 classes, every deep head, a few epochs."""
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    n, labels = 180, ["bird", "cat", "dog"]
    y = rng.integers(0, 3, n)
    image = (rng.normal(size=(n, 12)) + 1.5 * np.eye(3, 12)[y]).astype(np.float32)
    text = (rng.normal(size=(n, 8)) + 1.5 * np.eye(3, 8)[y]).astype(np.float32)
    split = np.array(["train", "val", "test"])[np.arange(n) % 5 % 3]
    pd.DataFrame({"id": [f"r{i}" for i in range(n)], "label": [labels[k] for k in y], "split": split}).to_parquet(
        root / "validated.parquet"
    )
    np.save(root / "image.npy", image)
    np.save(root / "text.npy", text)
    # The heads on frozen features that are chosen on validation (the ensemble and the probe: test_ensemble.py)
    deep = [h for h in HEADS if h != "linear_probe"]
    cfg = TrainConfig(hidden_dim=16, max_epochs=5, patience=3, lr=5e-3, heads=deep, stacking={"folds": 3},
                      finetune={"enabled": False})
    train_all(root / "validated.parquet", root / "image.npy", root / "text.npy", cfg, root / "train")
    return root


def test_evaluate_all_writes_metrics_plots_and_per_class(trained):
    out = trained / "reports"
    metrics = evaluate_all(trained / "train", out)
    on_disk = json.loads((out / "metrics.json").read_text())
    assert on_disk == json.loads(json.dumps(metrics))
    heads = metrics["heads"]
    assert list(heads) == ["image_only", "text_only", "concat", "gated", "add", "late", "attention", "stacking"]
    for name, h in heads.items():
        assert {"val", "test", "per_class", "family", "temperature", "ece", "ece_calibrated"} <= set(h)
        assert {"accuracy", "macro_f1", "roc_auc", "ece"} <= set(h["test"])
        assert h["family"] == "frozen" and h["ece"] == h["test"]["ece"] and h["temperature"] > 0
        assert h["test_calibrated"]["macro_f1"] == h["test"]["macro_f1"]  # scaling keeps every decision
        assert (out / "plots" / f"{name}_reliability.png").is_file()
        assert 0 <= h["test"]["macro_f1"] <= 1 and 0 <= h["val"]["ece"] <= 1
        per_class = json.loads((out / "per_class" / f"{name}.json").read_text())
        assert per_class == h["per_class"]
        assert {"bird", "cat", "dog", "macro avg"} <= set(per_class)
        assert per_class["macro avg"]["f1-score"] == pytest.approx(h["test"]["macro_f1"])
        for kind in ("confusion", "roc"):
            assert (out / "plots" / f"{name}_{kind}.png").read_bytes()[:8] == PNG_MAGIC
    # winners are picked on VALIDATION macro-F1, the gain is reported on TEST
    fusion = [n for n in heads if n not in ("image_only", "text_only")]
    assert metrics["best_fusion"] in fusion and metrics["best_unimodal"] in ("image_only", "text_only")
    assert heads[metrics["best_fusion"]]["val"]["macro_f1"] == max(heads[n]["val"]["macro_f1"] for n in fusion)
    assert heads[metrics["best_head"]]["val"]["macro_f1"] == max(h["val"]["macro_f1"] for h in heads.values())
    gain = heads[metrics["best_fusion"]]["test"]["macro_f1"] - heads[metrics["best_unimodal"]]["test"]["macro_f1"]
    assert metrics["fusion_gain_macro_f1"] == pytest.approx(gain)
    # the gain comes with a paired bootstrap interval on the same test rows
    interval = metrics["fusion_gain_interval"]["over_unimodal"]
    assert interval["delta"] == pytest.approx(gain) and interval["n_rows"] == len(np.load(
        trained / "train" / "concat" / "predictions.npz")["test_y"])
    assert interval["ci_low"] <= interval["delta"] <= interval["ci_high"] and interval["confidence"] == 0.95
    assert metrics["fusion_gain_interval"]["over_linear_probe"] is None  # no probe trained here
    assert metrics["selection_metric"] == "macro_f1"
    table = comparison_table(metrics)
    assert len(table.splitlines()) == 2 + 8 + 1 and metrics["best_fusion"] in table.splitlines()[-1]
    assert f"95% CI {100 * interval['ci_low']:+.1f} to {100 * interval['ci_high']:+.1f} points" in table


def test_evaluate_all_needs_a_training_output(tmp_path):
    with pytest.raises(FileNotFoundError, match="labels.json"):
        evaluate_all(tmp_path, tmp_path / "out")
    (tmp_path / "labels.json").write_text('["a", "b"]')
    with pytest.raises(FileNotFoundError, match="no trained heads"):
        evaluate_all(tmp_path, tmp_path / "out")


def test_evaluate_all_tolerates_a_split_without_test_rows(tmp_path):
    rng = np.random.default_rng(1)
    n = 40
    y = np.arange(n) % 2
    split = np.where(np.arange(n) % 4 == 0, "val", "train")  # no test rows at all
    pd.DataFrame({"id": [f"r{i}" for i in range(n)], "label": y.astype(str), "split": split}).to_parquet(
        tmp_path / "v.parquet"
    )
    np.save(tmp_path / "i.npy", rng.normal(size=(n, 4)).astype(np.float32))
    np.save(tmp_path / "t.npy", rng.normal(size=(n, 3)).astype(np.float32))
    cfg = TrainConfig(hidden_dim=8, max_epochs=1, heads=["text_only", "concat"])
    train_all(tmp_path / "v.parquet", tmp_path / "i.npy", tmp_path / "t.npy", cfg, tmp_path / "train")
    metrics = evaluate_all(tmp_path / "train", tmp_path / "out")
    assert metrics["heads"]["concat"]["test"]["macro_f1"] is None
    assert metrics["heads"]["concat"]["val"]["n"] == 10
    assert metrics["best_fusion"] == "concat" and metrics["fusion_gain_macro_f1"] is None
    assert metrics["fusion_gain_interval"] == {"over_unimodal": None, "over_linear_probe": None}
    assert (tmp_path / "out" / "plots" / "concat_roc.png").is_file()
    assert "n/a" in comparison_table(metrics)
