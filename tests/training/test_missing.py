"""Missing modalities in training: modality dropout never hides both inputs of a row, makes predictions from one
modality good, leaves unimodal and late heads alone, and train_all accepts rows with one modality absent."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from crossmodal.config import TrainConfig
from crossmodal.errors import TrainError
from crossmodal.evaluation.metrics import compute_metrics
from crossmodal.heads.inference import predict_proba, without
from crossmodal.training.dataset import SplitFeatures
from crossmodal.training.loop import modality_dropout, train_head
from crossmodal.training.train import train_all


def test_modality_dropout_never_hides_both():
    g = torch.Generator().manual_seed(0)
    image, text = torch.ones(20000, 3), torch.ones(20000, 2)
    text[:1000] = float("nan")  # already missing text: their image must stay
    di, dt = modality_dropout(image, text, 0.4, g)
    gone_i, gone_t = torch.isnan(di).all(1), torch.isnan(dt).all(1)
    assert not (gone_i & gone_t).any()
    assert not gone_i[:1000].any()
    rate = 0.4 - 0.4**2 / 2  # a coin decides when both are drawn
    assert abs(gone_i[1000:].float().mean().item() - rate) < 0.02
    assert abs(gone_t[1000:].float().mean().item() - rate) < 0.02
    assert modality_dropout(image, text, 0.0, g)[0] is image


def demo_like(n=900, seed=1) -> SplitFeatures:
    """Three classes, as in the demo, but both modalities informative on their own: the caption's sentiment
    (positive / negative / neutral; the neutral class sits at the text features' mean) and the picture's mood.
    Text is the stronger signal, so a head trained on complete rows leans on it."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    image = rng.normal(size=(n, 32)) * 3 + 10 + 0.75 * rng.normal(size=(3, 32))[y]
    text = rng.normal(size=(n, 24)) * 0.05
    text[:, 0] += 0.15 * np.array([1.0, -1.0, 0.0])[y]
    split = rng.choice(np.array(["train", "val", "test"]), size=n, p=[0.6, 0.2, 0.2])
    return SplitFeatures.from_arrays(image, text, y, split)


@pytest.fixture(scope="module")
def demo_task() -> SplitFeatures:
    return demo_like()


@pytest.mark.parametrize("name", ["gated", "attention"])
def test_modality_dropout_degrades_gracefully(demo_task, name):
    d = demo_task
    fast = dict(hidden_dim=32, dropout=0.1, lr=1e-2, batch_size=64, max_epochs=60, patience=15)

    def scores(rate):
        head, _ = train_head(name, d, TrainConfig(**fast, modality_dropout=rate), num_classes=3)
        ti, tt = d.image["test"], d.text["test"]
        return {k: compute_metrics(d.y["test"], predict_proba(head, a, b), ["pos", "neg", "neu"])["macro_f1"]
                for k, (a, b) in {"full": (ti, tt), "no_text": (ti, without(tt)), "no_image": (without(ti), tt)}.items()}

    plain, dropped = scores(0.0), scores(0.3)
    # Chance macro-F1 is about 0.33 on three balanced classes.
    assert dropped["no_text"] > 0.55, dropped
    assert dropped["no_text"] > plain["no_text"] + 0.15, (plain, dropped)
    assert dropped["no_image"] > 0.7, dropped
    assert dropped["full"] > plain["full"] - 0.05, (plain, dropped)


def test_modality_dropout_leaves_unimodal_and_late_heads_alone(demo_task):
    fast = dict(hidden_dim=16, max_epochs=3, patience=3)
    for name in ("text_only", "late"):
        plain, _ = train_head(name, demo_task, TrainConfig(**fast), num_classes=3)
        dropped, _ = train_head(name, demo_task, TrainConfig(**fast, modality_dropout=0.5), num_classes=3)
        for a, b in zip(plain.state_dict().values(), dropped.state_dict().values()):
            torch.testing.assert_close(a, b)


def test_train_all_accepts_absent_rows_and_writes_robustness_outputs(tmp_path):
    rng = np.random.default_rng(0)
    n = 90
    y = np.arange(n) % 3
    image, text = rng.normal(size=(n, 6)).astype(np.float32), rng.normal(size=(n, 4)).astype(np.float32)
    image[::7], text[1::7] = np.nan, np.nan  # never both in one row
    split = np.array(["train", "val", "test"])[np.arange(n) % 5 % 3]
    df = pd.DataFrame({"id": [f"r{i}" for i in range(n)], "label": np.array(["a", "b", "c"])[y], "split": split})
    df.to_parquet(tmp_path / "v.parquet")
    np.save(tmp_path / "i.npy", image)
    np.save(tmp_path / "t.npy", text)
    cfg = TrainConfig(heads=["concat", "gated"], hidden_dim=16, max_epochs=2, modality_dropout=0.3)
    train_all(tmp_path / "v.parquet", tmp_path / "i.npy", tmp_path / "t.npy", cfg, tmp_path / "out")
    n_test = int((split == "test").sum())
    for name in cfg.heads:
        with np.load(tmp_path / "out" / name / "predictions.npz") as npz:
            for key in ("test_proba_missing_text", "test_proba_missing_image"):
                assert npz[key].shape == (n_test, 3) and np.isfinite(npz[key]).all()
            assert ("test_gate" in npz.files) == (name == "gated")
            if name == "gated":
                assert npz["test_gate"].shape == (n_test, 2)
                np.testing.assert_allclose(npz["test_gate"].sum(1), 1, atol=1e-5)
    both = text.copy()
    both[0] = np.nan  # row 0 has no image either
    np.save(tmp_path / "t2.npy", both)
    with pytest.raises(TrainError, match="'r0' has neither image nor text"):
        train_all(tmp_path / "v.parquet", tmp_path / "i.npy", tmp_path / "t2.npy", cfg, tmp_path / "out")
