"""Training loop: fusion learns what no single modality can, class weights, optimizers,
reproducibility, early stopping, and the files train_all writes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crossmodal.config import TrainConfig, from_dict
from crossmodal.errors import ConfigError, TrainError
from crossmodal.evaluation.metrics import compute_metrics
from crossmodal.heads.files import load_head
from crossmodal.heads.inference import predict_proba
from crossmodal.training.dataset import SplitFeatures
from crossmodal.training.loop import balanced_class_weights, best_epoch, make_optimizer, train_head
from crossmodal.training.train import train_all

FAST = dict(hidden_dim=32, dropout=0.1, lr=1e-2, batch_size=64, max_epochs=60, patience=15)


def _splits(n: int, rng) -> np.ndarray:
    return rng.choice(np.array(["train", "val", "test"]), size=n, p=[0.6, 0.2, 0.2])


def xor_task(n=600, di=16, dt=12, seed=0) -> SplitFeatures:
    """label = image bit XOR text bit; each bit is readable from one dimension of one modality only."""
    rng = np.random.default_rng(seed)
    bit_i, bit_t = rng.integers(0, 2, n), rng.integers(0, 2, n)
    image = rng.normal(size=(n, di)) * 3 + 10  # CNN-like scale and offset
    text = rng.normal(size=(n, dt)) * 0.05  # small, sentence-embedding-like scale
    image[:, 3] = 10 + 3 * (2 * bit_i - 1) + rng.normal(0, 0.5, n)
    text[:, 5] = 0.05 * (2 * bit_t - 1) + rng.normal(0, 0.008, n)
    return SplitFeatures.from_arrays(image, text, bit_i ^ bit_t, _splits(n, rng))


def text_only_task(n=400, seed=1) -> SplitFeatures:
    """Only text carries the label; image features are pure noise."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    text = rng.normal(size=(n, 8))
    text[:, 0] += 2.5 * (2 * y - 1)
    return SplitFeatures.from_arrays(rng.normal(size=(n, 10)), text, y, _splits(n, rng))


def _test_f1(head, data: SplitFeatures) -> float:
    proba = predict_proba(head, data.image["test"], data.text["test"])
    return compute_metrics(data.y["test"], proba, ["0", "1"])["macro_f1"]


@pytest.fixture(scope="module")
def xor() -> SplitFeatures:
    return xor_task()


@pytest.mark.parametrize("name", ["concat", "add", "gated", "attention"])
def test_fusion_heads_learn_a_cross_modal_xor(xor, name):
    head, history = train_head(name, xor, TrainConfig(**FAST), num_classes=2)
    assert _test_f1(head, xor) > 0.9, history[-1]


@pytest.mark.parametrize("name", ["image_only", "text_only"])
def test_unimodal_heads_cannot_solve_the_xor(xor, name):
    head, _ = train_head(name, xor, TrainConfig(**FAST), num_classes=2)
    assert _test_f1(head, xor) < 0.7


def test_late_fusion_weight_moves_to_the_informative_modality():
    data = text_only_task()
    head, _ = train_head("late", data, TrainConfig(**FAST), num_classes=2)
    w = float(head.image_weight)
    assert w < 0.5, w  # image weight; the text classifier is the one that knows the label
    assert _test_f1(head, data) > 0.9


def test_balanced_class_weights_values():
    weights = balanced_class_weights(np.array([0, 0, 0, 1]), 3)
    np.testing.assert_allclose(weights, [4 / (3 * 3), 4 / (3 * 1), 0.0], rtol=1e-6)  # class 2 absent: weight 0


def test_class_weights_change_the_loss():
    rng = np.random.default_rng(3)
    y = (rng.random(300) < 0.15).astype(int)  # imbalanced: 15% positives
    image, text = rng.normal(size=(300, 6)) + y[:, None], rng.normal(size=(300, 4))
    data = SplitFeatures.from_arrays(image, text, y, _splits(300, rng))
    cfg = TrainConfig(**{**FAST, "max_epochs": 2})
    _, weighted = train_head("concat", data, cfg.model_copy(update={"class_weights": True}), 2)
    _, plain = train_head("concat", data, cfg.model_copy(update={"class_weights": False}), 2)
    assert weighted[0]["train_loss"] != pytest.approx(plain[0]["train_loss"], rel=1e-3)
    assert weighted[0]["val_loss"] != pytest.approx(plain[0]["val_loss"], rel=1e-3)


@pytest.mark.parametrize("optimizer", ["adam", "adamw", "sgd", "rmsprop"])
def test_every_optimizer_trains(xor, optimizer):
    head, history = train_head("concat", xor, TrainConfig(**{**FAST, "max_epochs": 3, "optimizer": optimizer}), 2)
    assert len(history) == 3
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in history)
    assert history[-1]["train_loss"] < history[0]["train_loss"] * 1.5


def test_unknown_optimizer_fails_clearly():
    with pytest.raises(ConfigError, match="train.optimizer"):
        from_dict({"train": {"optimizer": "lamb"}})
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'.*adamw"):
        make_optimizer("lamb", [torch.nn.Parameter(torch.zeros(1))], 1e-3, 0.0)


def test_same_seed_same_weights_and_predictions(xor):
    cfg = TrainConfig(**{**FAST, "max_epochs": 4, "patience": 10})
    first = {}
    for name in ("gated", "attention"):  # dropout + random init + batch order all seeded
        a, hist_a = train_head(name, xor, cfg, 2)
        first[name] = a
        b, hist_b = train_head(name, xor, cfg, 2)
        assert hist_a == hist_b
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), key
        test_a = predict_proba(a, xor.image["test"], xor.text["test"])
        assert np.array_equal(test_a, predict_proba(b, xor.image["test"], xor.text["test"]))
    c, _ = train_head("gated", xor, cfg.model_copy(update={"seed": 1}), 2)
    assert not torch.equal(c.state_dict()["classifier.0.weight"], first["gated"].state_dict()["classifier.0.weight"])


def test_early_stopping_stops_on_a_plateau():
    # A learning rate too small to move anything: validation macro-F1 is flat from epoch 1.
    cfg = TrainConfig(**{**FAST, "optimizer": "sgd", "lr": 1e-12, "max_epochs": 50, "patience": 3})
    _, history = train_head("concat", xor_task(n=200), cfg, 2)
    assert len(history) == 1 + cfg.patience < cfg.max_epochs


def test_early_stopping_restores_the_best_epoch():
    # Random labels: validation F1 wanders, so the last epoch is (almost surely) not the best one.
    rng = np.random.default_rng(5)
    n = 300
    image, text, y = rng.normal(size=(n, 8)), rng.normal(size=(n, 8)), rng.integers(0, 2, n)
    data = SplitFeatures.from_arrays(image, text, y, _splits(n, rng))
    cfg = TrainConfig(**{**FAST, "lr": 1e-2, "max_epochs": 60, "patience": 5})
    head, history = train_head("concat", data, cfg, 2)
    best = best_epoch(history)
    f1s = [h["val_macro_f1"] for h in history]
    assert history[best - 1]["val_macro_f1"] == max(f1s)
    assert len(history) < cfg.max_epochs
    first_max = f1s.index(max(f1s)) + 1
    assert len(history) == first_max + cfg.patience  # stopped `patience` epochs after the last F1 gain
    assert history[-1]["val_loss"] != history[best - 1]["val_loss"]
    with torch.no_grad():
        val_logits = head(torch.from_numpy(data.image["val"]), torch.from_numpy(data.text["val"]))
    criterion = torch.nn.CrossEntropyLoss(weight=torch.from_numpy(balanced_class_weights(data.y["train"], 2)))
    restored_loss = float(criterion(val_logits, torch.from_numpy(data.y["val"])))
    assert restored_loss == pytest.approx(history[best - 1]["val_loss"], rel=1e-5)


def test_split_features_rejects_inconsistent_inputs():
    with pytest.raises(TrainError, match="row counts differ"):
        SplitFeatures.from_arrays(np.zeros((3, 2)), np.zeros((4, 2)), [0, 1, 0], ["train"] * 3)
    with pytest.raises(TrainError, match="unknown split"):
        SplitFeatures.from_arrays(np.zeros((2, 2)), np.zeros((2, 2)), [0, 1], ["train", "holdout"])
    data = SplitFeatures.from_arrays(np.zeros((4, 2)), np.zeros((4, 2)), [0, 1, 0, 1], ["train"] * 4)
    with pytest.raises(TrainError, match="val split has no rows"):
        train_head("concat", data, TrainConfig(**FAST), 2)


# ---------------------------------------------------------------- train_all on files


def test_train_all_writes_the_contract_files(tmp_path, write_inputs):
    paths, df = write_inputs(tmp_path)
    (tmp_path / "out" / "add").mkdir(parents=True)
    (tmp_path / "out" / "add" / "head.json").write_text("{}")  # left by an earlier run with other heads
    cfg = TrainConfig(**{**FAST, "max_epochs": 3, "heads": ["image_only", "concat", "late"]})
    result = train_all(*paths, cfg, tmp_path / "out")
    out = tmp_path / "out"
    assert json.loads((out / "labels.json").read_text()) == ["bird", "cat", "dog"]
    assert not (out / "add").exists()
    assert result.heads == ["image_only", "concat", "late"]
    rows = {s: int((df.split == s).sum()) for s in ("train", "val", "test")}
    assert json.loads(json.dumps(result.to_dict()))["rows"] == rows
    for name in cfg.heads:
        meta = json.loads((out / name / "head.json").read_text())
        assert {"name", "modality", "init_args", "best_epoch", "epochs_run", "history", "val_metrics"} <= set(meta)
        assert meta["epochs_run"] == len(meta["history"]) == 3 and 1 <= meta["best_epoch"] <= 3
        assert set(meta["history"][0]) == {"epoch", "train_loss", "val_loss", "val_macro_f1"}
        with np.load(out / name / "predictions.npz", allow_pickle=False) as npz:
            assert set(npz.files) == ({f"{s}_{k}" for s in ("val", "test") for k in ("proba", "y", "ids")}
                                      | {"test_proba_missing_text", "test_proba_missing_image"})  # no gates here
            assert npz["test_proba_missing_text"].shape == npz["test_proba"].shape
            val = df[df.split == "val"]
            assert npz["val_proba"].shape == (len(val), 3) and npz["val_proba"].dtype == np.float32
            assert list(npz["val_ids"]) == list(val["id"])
            labels = ["bird", "cat", "dog"]
            assert list(npz["val_y"]) == [labels.index(v) for v in val["label"]]
            np.testing.assert_allclose(npz["test_proba"].sum(1), 1.0, atol=1e-5)
        head = load_head(out / name)  # the saved head reproduces the saved predictions
        test = df.split.to_numpy() == "test"
        proba = predict_proba(head, np.load(paths[1])[test], np.load(paths[2])[test])
        with np.load(out / name / "predictions.npz") as npz:
            np.testing.assert_array_equal(proba, npz["test_proba"])


def test_train_all_rejects_stale_or_broken_inputs(tmp_path, write_inputs):
    paths, df = write_inputs(tmp_path, n=30)
    cfg = TrainConfig(**{**FAST, "max_epochs": 1, "heads": ["concat"]})
    np.save(tmp_path / "short.npy", np.zeros((29, 10), np.float32))
    with pytest.raises(TrainError, match=r"short\.npy.*30 rows.*re-run `crossmodal extract`"):
        train_all(paths[0], tmp_path / "short.npy", paths[2], cfg, tmp_path / "out")
    bad = np.load(paths[2])
    bad[7, 2] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(TrainError, match="NaN/inf in 1 row.*'id7'"):
        train_all(paths[0], paths[1], tmp_path / "nan.npy", cfg, tmp_path / "out")
    with pytest.raises(TrainError, match="not found"):
        train_all(paths[0], tmp_path / "missing.npy", paths[2], cfg, tmp_path / "out")
    df.assign(label="same").to_parquet(tmp_path / "one.parquet")
    with pytest.raises(TrainError, match="at least 2"):
        train_all(tmp_path / "one.parquet", paths[1], paths[2], cfg, tmp_path / "out")
    df.drop(columns="split").to_parquet(tmp_path / "nosplit.parquet")
    with pytest.raises(TrainError, match=r"lacks column\(s\) \['split'\]"):
        train_all(tmp_path / "nosplit.parquet", paths[1], paths[2], cfg, tmp_path / "out")
