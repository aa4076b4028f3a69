"""Stacking late fusion: stratified folds, out-of-fold probabilities without leakage, fitting, safetensors round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crossmodal.config import TrainConfig
from crossmodal.data.split import SPLITS
from crossmodal.heads.files import load_head
from crossmodal.heads.inference import predict_proba
from crossmodal.training import loop, stacking
from crossmodal.training.dataset import SplitFeatures
from crossmodal.training.stacking import fold_assignment, folds_to_predict, out_of_fold_probabilities, train_stacking
from crossmodal.training.train import train_all

FAST = dict(hidden_dim=16, dropout=0.1, lr=1e-2, batch_size=64, max_epochs=8, patience=4)


def complementary_task(n=450, seed=0) -> SplitFeatures:
    """3 classes: the image tells class 0 from the rest, the text tells class 1 from class 2."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    image = rng.normal(size=(n, 6))
    image[:, 0] += 3.0 * (y == 0)
    text = rng.normal(size=(n, 5))
    text[:, 0] += 3.0 * (y == 1) - 3.0 * (y == 2)
    split = np.array(["train", "val", "test"])[rng.choice(3, size=n, p=[0.6, 0.2, 0.2])]
    ids = [f"r{i}" for i in range(n)]
    return SplitFeatures.from_arrays(image, text, y, split, ids)


@pytest.fixture(scope="module")
def task() -> SplitFeatures:
    return complementary_task()


def test_fold_assignment_is_stratified_balanced_and_seeded():
    y = np.array([0] * 23 + [1] * 9 + [2] * 4)
    folds = fold_assignment(y, 4, seed=3)
    assert set(folds) == {0, 1, 2, 3}
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 1
    for c in range(3):
        per_fold = np.bincount(folds[y == c], minlength=4)
        assert per_fold.max() - per_fold.min() <= 1, (c, per_fold)
    assert np.array_equal(folds, fold_assignment(y, 4, seed=3))
    assert not np.array_equal(folds, fold_assignment(y, 4, seed=4))
    with pytest.raises(ValueError, match="at least 5 train rows"):
        fold_assignment(np.array([0, 1, 0]), 5, 0)


@pytest.fixture
def train_calls(monkeypatch):
    """Every train_head call as (head name, ids it trained on, ids it predicts), in call order."""
    calls = []
    real = loop.train_head

    def spy(name, data, cfg, num_classes):
        calls.append((name, set(data.ids["train"]), list(data.ids["test"])))
        return real(name, data, cfg, num_classes)

    monkeypatch.setattr(stacking, "train_head", spy)  # the name the fold fitting calls
    return calls


def test_out_of_fold_probabilities_never_come_from_a_head_that_saw_the_row(task, train_calls):
    calls = train_calls
    cfg = TrainConfig(**FAST, stacking={"folds": 3})
    oof, folds = out_of_fold_probabilities(task, cfg, 3)
    assert len(calls) == 2 * 3  # two unimodal heads per fold
    train_ids = list(task.ids["train"])
    for modality in ("image_only", "text_only"):
        predicted = []
        for name, seen, held_out in calls:
            if name == modality:
                assert not seen & set(held_out), "a head predicted rows it was trained on"
                assert seen | set(held_out) == set(train_ids)
                predicted += held_out
        assert sorted(predicted) == sorted(train_ids)  # every train row predicted exactly once
    for k in range(3):  # the probabilities sit in the rows of the fold they were predicted for
        assert sorted(np.asarray(train_ids)[folds == k]) == sorted(calls[2 * k][2])
    assert oof.shape == (len(train_ids), 6)
    np.testing.assert_allclose(oof[:, :3].sum(1), 1, atol=1e-5)
    np.testing.assert_allclose(oof[:, 3:].sum(1), 1, atol=1e-5)


def test_folds_to_predict_covers_oof_rows_with_whole_folds():
    assert folds_to_predict(8192, 5, 8192) == 5  # up to oof_rows train rows: every fold
    assert folds_to_predict(35_007, 5, 8192) == 2  # the benchmark's train split: 2 folds of 7,000 rows
    assert folds_to_predict(12_000, 5, 8192) == 4
    assert folds_to_predict(10**7, 5, 8192) == 1
    assert folds_to_predict(10**7, 5, None) == 5  # null: every fold


def test_a_large_train_split_predicts_fewer_folds_with_the_same_fold_models(task, train_calls):
    calls = train_calls
    cfg = TrainConfig(**FAST, stacking={"folds": 3, "oof_rows": 100})  # ~270 train rows: 2 folds hold 100 rows
    oof, folds = out_of_fold_probabilities(task, cfg, 3)
    train_ids = np.asarray(task.ids["train"])
    assert len(calls) == 2 * 2  # two unimodal heads for each of the 2 folds predicted
    for k in range(2):
        for _, seen, held_out in calls[2 * k : 2 * k + 2]:
            assert sorted(held_out) == sorted(train_ids[folds == k])
            assert seen == set(train_ids[folds != k])  # the model the full K-fold trains: every other fold
    predicted = folds < 2
    assert np.isfinite(oof[predicted]).all() and np.isnan(oof[~predicted]).all()

    calls.clear()
    _, history = train_stacking(task, cfg, 3)  # the meta-classifier learns from the predicted rows only
    assert history[0]["oof_rows"] == int(predicted.sum())


@pytest.mark.parametrize("meta", ["logistic", "mlp"])
def test_stacking_combines_complementary_modalities(task, meta):
    cfg = TrainConfig(**FAST, stacking={"folds": 3, "meta": meta, "mlp_hidden": 8})
    head, history = train_stacking(task, cfg, 3)
    f1 = {}
    for name in ("image_only", "text_only"):
        uni, _ = loop.train_head(name, task, cfg, 3)
        f1[name] = loop.macro_f1(task.y["test"], predict_proba(uni, task.image["test"], task.text["test"]).argmax(1))
    stacked = loop.macro_f1(task.y["test"], predict_proba(head, task.image["test"], task.text["test"]).argmax(1))
    assert stacked > 0.85 and stacked > max(f1.values()) + 0.15, (stacked, f1)
    (row,) = history
    assert {"train_loss", "val_loss", "val_macro_f1", "oof_macro_f1_image", "oof_macro_f1_text"} <= set(row)


def test_stacking_is_saved_as_safetensors_and_loads_back(tmp_path, task):
    import pandas as pd

    n = sum(len(task.y[s]) for s in SPLITS)
    split = np.concatenate([[s] * len(task.y[s]) for s in SPLITS])
    labels = ["a", "b", "c"]
    y = np.concatenate([task.y[s] for s in SPLITS])
    pd.DataFrame({"id": [f"r{i}" for i in range(n)], "label": [labels[k] for k in y], "split": split}).to_parquet(
        tmp_path / "validated.parquet")
    np.save(tmp_path / "image.npy", np.concatenate([task.image[s] for s in SPLITS]))
    np.save(tmp_path / "text.npy", np.concatenate([task.text[s] for s in SPLITS]))
    cfg = TrainConfig(**FAST, heads=["image_only", "text_only", "stacking"], stacking={"folds": 3, "meta": "mlp"})
    train_all(tmp_path / "validated.parquet", tmp_path / "image.npy", tmp_path / "text.npy", cfg, tmp_path / "out")

    folder = tmp_path / "out" / "stacking"
    assert (folder / "weights.safetensors").read_bytes()[8:9] == b"{"  # safetensors: 8-byte length, JSON header
    assert not list(folder.glob("*.pt")) and not list(folder.glob("*.pkl"))
    meta = json.loads((folder / "head.json").read_text())
    assert meta["family"] == "frozen" and meta["modality"] == "fusion" and meta["init_args"]["meta"] == "mlp"
    head = load_head(folder)
    with np.load(folder / "predictions.npz") as npz:
        np.testing.assert_array_equal(predict_proba(head, task.image["test"], task.text["test"]), npz["test_proba"])
    # The base heads inside are the stand-alone unimodal heads (reused, not retrained differently).
    image_only = load_head(tmp_path / "out" / "image_only")
    for key, value in image_only.state_dict().items():
        assert torch.equal(head.image_head.state_dict()[key], value), key
