"""Traditional baselines: HOG and colour features, TF-IDF, the three scikit-learn heads, absent modalities."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from crossmodal.config import TRADITIONAL_HEADS, TrainConfig
from crossmodal.errors import TrainError
from crossmodal.evaluation.evaluate import evaluate_all
from crossmodal.training.traditional import hog, image_descriptor
from crossmodal.training.train import train_all


def test_hog_finds_the_gradient_orientation():
    vertical_edge = np.zeros((32, 32))
    vertical_edge[:, 16:] = 1.0  # intensity changes along x: gradient direction 0 degrees
    horizontal_edge = vertical_edge.T  # gradient direction 90 degrees
    # 9 bins of 20 degrees centred on 10, 30, ..., 170: 90 degrees falls in bin 4; 0 degrees is shared by bins 8 and 0.
    for image, bins in ((vertical_edge, [8, 0]), (horizontal_edge, [4])):
        h = hog(image, cell=8, orientations=9)
        assert h.shape == (3 * 3 * 4 * 9,)  # 4x4 cells -> 3x3 blocks of 2x2 cells x 9 bins
        votes = h.reshape(-1, 9).sum(0)
        assert votes[bins].sum() > 0.99 * votes.sum(), votes
        if len(bins) == 2:
            assert votes[8] == pytest.approx(votes[0])
    assert np.all(hog(np.zeros((32, 32))) == 0)  # a flat image has no gradients
    with pytest.raises(ValueError, match="2x2 cells"):
        hog(np.zeros((8, 8)), cell=8)


def test_image_descriptor_sees_colour():
    cfg = TrainConfig().traditional
    red = image_descriptor(Image.new("RGB", (40, 30), (220, 20, 20)), cfg)
    blue = image_descriptor(Image.new("RGB", (40, 30), (20, 20, 220)), cfg)
    assert red.shape == blue.shape and red.dtype == np.float32
    hue = slice(0, cfg.color_bins)
    assert not np.array_equal(red[hue], blue[hue])
    np.testing.assert_allclose(red[hue].sum(), 1.0, atol=1e-6)  # a normalised histogram


def learnable_rows(root, n=90, seed=0) -> pd.DataFrame:
    """label = colour of the image; the caption names the label half the time (else a neutral sentence)."""
    rng = np.random.default_rng(seed)
    labels = ["red", "green", "blue"]
    colours = {"red": (200, 40, 40), "green": (40, 180, 60), "blue": (40, 60, 200)}
    words = {"red": "a fiery sunset photo", "green": "a leafy forest photo", "blue": "a calm ocean photo"}
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = labels[i % 3]
        pixels = np.clip(np.array(colours[label]) + rng.normal(0, 25, size=(24, 24, 3)), 0, 255).astype(np.uint8)
        path = root / "img" / f"{i}.png"
        Image.fromarray(pixels).save(path)
        text = words[label] if rng.random() < 0.5 else "a photo"
        rows.append({"id": f"r{i}", "image": str(path), "text": text, "label": label,
                     "split": ["train", "train", "val", "test", "train"][i % 5]})
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("traditional")
    df = learnable_rows(root)
    df.loc[df.index[3], "text"] = ""  # an absent caption: an empty TF-IDF row
    df.loc[df.index[7], "image"] = None  # an absent image: a zero feature row
    df.to_parquet(root / "validated.parquet")
    rng = np.random.default_rng(1)  # the deep features are not read by these heads
    np.save(root / "image.npy", rng.normal(size=(len(df), 4)).astype(np.float32))
    np.save(root / "text.npy", rng.normal(size=(len(df), 3)).astype(np.float32))
    cfg = TrainConfig(heads=["image_only", *TRADITIONAL_HEADS], max_epochs=2, hidden_dim=8,
                      traditional={"image_size": 32})
    result = train_all(root / "validated.parquet", root / "image.npy", root / "text.npy", cfg, root / "models")
    return root, df, result


def test_traditional_heads_beat_chance_and_write_the_contract_files(trained):
    root, df, result = trained
    test = df[df.split == "test"]
    for name, modality in zip(TRADITIONAL_HEADS, ("text", "image", "fusion"), strict=True):
        meta = json.loads((root / "models" / name / "head.json").read_text())
        assert meta["family"] == "traditional" and meta["modality"] == modality
        assert meta["epochs_run"] == len(meta["history"]) == 3 and meta["init_args"]["C"] in (0.1, 1.0, 10.0)
        with np.load(root / "models" / name / "predictions.npz") as npz:
            assert npz["test_proba"].shape == (len(test), 3)
            assert list(npz["test_ids"]) == list(test["id"])
            np.testing.assert_allclose(npz["test_proba"].sum(1), 1, atol=1e-5)
            f1 = result.val_macro_f1[name]
            assert {"test_proba_missing_text", "test_proba_missing_image"} <= set(npz.files)
            if name == "traditional_text":  # the image is not read: removing it changes nothing
                np.testing.assert_array_equal(npz["test_proba_missing_image"], npz["test_proba"])
            if name == "traditional_image":
                np.testing.assert_array_equal(npz["test_proba_missing_text"], npz["test_proba"])
        chance = 1 / 3
        assert f1 > chance + 0.25, (name, f1)
    # Colour decides the label: the image baselines are near perfect, the half-informative captions are not.
    assert result.val_macro_f1["traditional_image"] > 0.9
    assert result.val_macro_f1["traditional_concat"] > 0.9


def test_evaluation_lists_the_baselines_but_never_picks_one(trained):
    root, _, _ = trained
    metrics = evaluate_all(root / "models", root / "reports")
    assert {metrics["heads"][n]["family"] for n in TRADITIONAL_HEADS} == {"traditional"}
    assert metrics["heads"]["image_only"]["family"] == "frozen"
    assert metrics["best_traditional"] in TRADITIONAL_HEADS
    assert metrics["best_head"] == metrics["registered_head"] == "image_only"  # the only deep head
    assert (root / "reports" / "plots" / "traditional_concat_reliability.png").is_file()


def test_traditional_heads_need_the_raw_columns(tmp_path):
    df = learnable_rows(tmp_path, n=30)
    df.drop(columns=["text"]).to_parquet(tmp_path / "v.parquet")
    np.save(tmp_path / "i.npy", np.zeros((30, 2), np.float32))
    np.save(tmp_path / "t.npy", np.zeros((30, 2), np.float32))
    cfg = TrainConfig(heads=["text_only", "traditional_text"], max_epochs=1)
    with pytest.raises(TrainError, match=r"lacks column\(s\) \['text'\]"):
        train_all(tmp_path / "v.parquet", tmp_path / "i.npy", tmp_path / "t.npy", cfg, tmp_path / "out")
    df.assign(text="").to_parquet(tmp_path / "v.parquet")
    with pytest.raises(TrainError, match="vocabulary"):
        train_all(tmp_path / "v.parquet", tmp_path / "i.npy", tmp_path / "t.npy", cfg, tmp_path / "out")
