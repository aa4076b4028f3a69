"""Traditional baseline variants: dense SIFT bag of visual words, PCA / LDA / CCA projections, the head.json record."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pydantic import ValidationError

from crossmodal.config import TRADITIONAL_HEADS, TraditionalConfig, TrainConfig, load_config
from crossmodal.errors import ConfigError, TrainError
from crossmodal.training.dataset import SplitFeatures
from crossmodal.training.projection import fit_cca, fit_projection, fit_reducer
from crossmodal.training.traditional import sift_bovw_features, train_traditional
from crossmodal.training.visual_words import bag_of_words, dense_sift, fit_vocabulary

LABELS = ["horizontal", "vertical", "diagonal"]


def stripes(kind: str, rng, size: int = 32) -> np.ndarray:
    """A grey uint8 image of stripes whose direction is the label, at a random phase and period, with noise."""
    yy, xx = np.mgrid[0:size, 0:size]
    coord = {"horizontal": yy, "vertical": xx, "diagonal": xx + yy}[kind]
    period = rng.integers(5, 8)
    wave = np.sin(2 * np.pi * (coord + rng.integers(0, period)) / period)
    return np.clip(128 + 90 * wave + rng.normal(0, 8, (size, size)), 0, 255).astype(np.uint8)


def striped_rows(root, n=60, seed=0) -> pd.DataFrame:
    """label = stripe direction of the image; the caption names it half the time, among filler words."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        label = LABELS[i % 3]
        path = root / "img" / f"{i}.png"
        Image.fromarray(stripes(label, rng)).convert("RGB").save(path)
        filler = ["thin", "bold", "grey", "old", "faint", "sharp", "soft", "dark"][rng.integers(0, 8)]
        text = f"{filler} {label} lines" if rng.random() < 0.5 else f"some {filler} lines"
        rows.append({"id": f"r{i}", "image": str(path), "text": text, "label": label,
                     "split": ["train", "train", "val", "test", "train"][i % 5]})
    return pd.DataFrame(rows)


def fit(root, df, **traditional):
    """train_traditional on ``df`` (written to validated.parquet); returns {head: head.json}."""
    root.mkdir(parents=True, exist_ok=True)
    df.to_parquet(root / "validated.parquet")
    labels = sorted(df["label"].unique())
    y = df["label"].map({label: i for i, label in enumerate(labels)}).to_numpy()
    zeros = np.zeros((len(df), 2), np.float32)  # the deep features: these heads never read them
    data = SplitFeatures.from_arrays(zeros, zeros, y, df["split"], df["id"])
    cfg = TrainConfig(heads=["image_only", *TRADITIONAL_HEADS],
                      traditional={"image_size": 32, "sift_step": 4, "sift_vocabulary": 16, **traditional})
    return train_traditional(root / "validated.parquet", data, labels, cfg, root / "models", list(TRADITIONAL_HEADS))


@pytest.fixture(scope="module")
def striped(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants")
    return root, striped_rows(root)


def test_dense_sift_covers_a_textured_image_and_skips_flat_patches():
    rng = np.random.default_rng(0)
    desc = dense_sift(stripes("vertical", rng, 32), step=4)
    assert desc.dtype == np.float32 and desc.shape == (49, 128)  # a 7x7 grid of 8-pixel patches
    assert (desc >= 0).all() and (desc.sum(1) > 0).all()
    assert dense_sift(np.full((32, 32), 200, np.uint8), step=4).shape == (0, 128)  # flat: no descriptor
    half = np.full((32, 32), 200, np.uint8)
    half[:, 16:] = stripes("horizontal", rng, 32)[:, 16:]
    assert 0 < len(dense_sift(half, step=4)) < 49  # only the textured half is described


def test_bag_of_words_is_a_fixed_size_l1_histogram_and_zero_without_descriptors():
    rng = np.random.default_rng(1)
    sets = [dense_sift(stripes(LABELS[i % 3], rng), step=4) for i in range(9)]
    vocabulary = fit_vocabulary(sets, size=12, seed=0, max_descriptors=1000)
    flat = dense_sift(np.zeros((32, 32), np.uint8), step=4)
    hist = bag_of_words([*sets, flat, None], vocabulary)
    assert hist.shape == (11, 12) and hist.dtype == np.float32
    np.testing.assert_allclose(hist[:9].sum(1), 1.0, rtol=1e-6)
    assert (hist[:9] >= 0).all()
    assert (hist[9] == 0).all()  # an image with no descriptors
    assert np.isnan(hist[10]).all()  # an absent image: filled with the training mean downstream
    # Stripes of one direction share words: each image's histogram is nearest to the others of its label.
    sim = hist[:9] @ hist[:9].T
    np.fill_diagonal(sim, -1)
    assert all(sim[i].argmax() % 3 == i % 3 for i in range(9))
    with pytest.raises(ValueError, match="fewer than the 5000 visual words"):
        fit_vocabulary(sets, size=5000, seed=0, max_descriptors=1000)


def test_the_vocabulary_is_fitted_on_train_rows_only(striped):
    root, df = striped
    cfg = TraditionalConfig(image_features="sift_bovw", image_size=32, sift_step=4, sift_vocabulary=16)
    ids = {s: df.loc[df.split == s, "id"].to_numpy() for s in ("train", "val", "test")}
    paths = {s: df.loc[df.split == s, "image"].tolist() for s in ("train", "val", "test")}
    before = sift_bovw_features(paths, ids, cfg, seed=0)
    # Other test images (flat, a colour, stripes of other periods) must not move the words the train rows use.
    other = root / "other"
    other.mkdir()
    rng = np.random.default_rng(5)
    new_paths = []
    for i in range(len(paths["test"])):
        pixels = stripes(LABELS[(i + 1) % 3], rng) if i % 2 else np.full((32, 32), 30 * i % 255, np.uint8)
        Image.fromarray(pixels).convert("RGB").save(other / f"{i}.png")
        new_paths.append(str(other / f"{i}.png"))
    after = sift_bovw_features({**paths, "test": new_paths}, ids, cfg, seed=0)
    for s in ("train", "val"):
        np.testing.assert_array_equal(before[s], after[s])
    assert not np.array_equal(before["test"], after["test"])
    assert (after["test"][0] == 0).all()  # a flat test image: no descriptors, all-zero histogram


@pytest.mark.parametrize(("projection", "dims"), [
    ("none", {"traditional_image": 16}),
    ("pca", {"traditional_text": 5, "traditional_image": 5, "traditional_concat": 10}),
    ("lda", {"traditional_text": 2, "traditional_image": 2, "traditional_concat": 4}),  # 3 classes: 2 dims each
    ("cca", {"traditional_image": 16, "traditional_concat": 10}),  # the unimodal heads stay unprojected
])
def test_each_projection_sets_the_dims_and_records_the_variant(striped, projection, dims):
    root, df = striped
    infos = fit(root / projection, df, image_features="sift_bovw", projection=projection, projection_dim=5)
    for name, info in infos.items():
        meta = json.loads((root / projection / "models" / name / "head.json").read_text())
        assert meta["variant"] == info["variant"]
        if name in dims:
            assert meta["init_args"]["num_features"] == dims[name], (projection, name)
        applied = projection if name == "traditional_concat" or projection in ("pca", "lda") else "none"
        assert meta["projection"] == applied
        assert meta["image_features"] == (None if name == "traditional_text" else "sift_bovw")
        with np.load(root / projection / "models" / name / "predictions.npz") as npz:
            np.testing.assert_allclose(npz["test_proba"].sum(1), 1, atol=1e-5)
            if name == "traditional_concat":  # fused: removing either modality changes the prediction
                assert not np.allclose(npz["test_proba_missing_image"], npz["test_proba"])
                assert not np.allclose(npz["test_proba_missing_text"], npz["test_proba"])
    suffix = "" if projection == "none" else f"+{projection}"
    assert infos["traditional_concat"]["variant"] == f"tfidf+sift_bovw{suffix}"
    assert infos["traditional_text"]["variant"] == "tfidf" + ("" if projection in ("none", "cca") else suffix)
    # The stripes decide the label: the image baselines see them in every variant.
    assert infos["traditional_image"]["val_metrics"]["macro_f1"] > 0.8, projection


def test_hog_color_with_a_projection_records_it(striped):
    root, df = striped
    infos = fit(root / "hog", df, projection="pca", projection_dim=4)
    assert infos["traditional_image"]["variant"] == "hog_color+pca"
    assert infos["traditional_image"]["init_args"]["num_features"] == 4
    assert infos["traditional_concat"]["variant"] == "tfidf+hog_color+pca"


def test_lda_keeps_at_most_classes_minus_one_dims():
    rng = np.random.default_rng(0)
    y = np.arange(40) % 4
    x = rng.normal(size=(40, 12)) + 3 * np.eye(4, 12)[y]
    project, k = fit_projection("lda", x, dim=10, seed=0, labels=y)
    assert k == 3 and project(x).shape == (40, 3)
    project, k = fit_projection("pca", x, dim=10, seed=0)
    assert k == 10 and project(x[:3]).shape == (3, 10)
    with pytest.raises(ValueError, match="at least 2 classes"):
        fit_projection("lda", x, dim=10, seed=0, labels=np.zeros(40))


def test_cca_projects_each_block_alone_as_sklearn_does():
    from sklearn.cross_decomposition import CCA

    rng = np.random.default_rng(0)
    shared = rng.normal(size=(80, 2))
    x = np.hstack([shared, rng.normal(size=(80, 4))]) @ rng.normal(size=(6, 6))
    y = np.hstack([shared, rng.normal(size=(80, 3))]) @ rng.normal(size=(5, 5))
    along_x, along_y, k = fit_cca(x, y, dim=3)
    assert k == 3 and along_x(x).shape == (80, 3) and along_y(y[:4]).shape == (4, 3)
    ref_x, ref_y = CCA(n_components=3, max_iter=500).fit(x, y).transform(x, y)
    np.testing.assert_allclose(along_x(x), ref_x, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(along_y(y), ref_y, rtol=1e-4, atol=1e-4)
    # The first canonical pair finds the shared signal.
    assert np.corrcoef(along_x(x)[:, 0], along_y(y)[:, 0])[0, 1] > 0.9
    # No more pairs than a block has independent directions (here 2: the shared signal, copied).
    _, _, k = fit_cca(x, np.repeat(shared, 3, axis=1), dim=5)
    assert k == 2


def test_reducer_keeps_sparse_tfidf_small():
    from scipy import sparse

    x = sparse.random(30, 500, density=0.05, random_state=0, format="csr")
    assert fit_reducer(x, dim=8, seed=0)(x).shape == (30, 8)
    dense = np.random.default_rng(0).normal(size=(30, 6))
    np.testing.assert_allclose(fit_reducer(dense, dim=8, seed=0)(dense), dense, rtol=1e-6)  # already narrow


def test_bad_combinations_are_clear_errors(striped, tmp_path):
    with pytest.raises(ValidationError, match="projection_dim 300 exceeds svd_dim 256"):
        TrainConfig(traditional={"projection": "pca", "projection_dim": 300})
    with pytest.raises(ValidationError, match="sift_step 40 .* larger than image_size 64"):
        TrainConfig(traditional={"image_features": "sift_bovw", "sift_step": 40})
    with pytest.raises(ValidationError, match="hog_cell 40 leaves fewer than 2x2"):
        TrainConfig(traditional={"hog_cell": 40})
    with pytest.raises(ValidationError, match="image_features"):
        TrainConfig(traditional={"image_features": "surf"})
    with pytest.raises(ConfigError, match="train.traditional.*projection_dim 300 exceeds svd_dim 256"):
        load_config(None, {"train.traditional.projection": "cca", "train.traditional.projection_dim": 300})
    _, df = striped
    with pytest.raises(TrainError, match="sift_vocabulary"):
        fit(tmp_path / "words", df, image_features="sift_bovw", sift_vocabulary=4096)
    one_class = df.assign(label=np.where(df.split == "train", "horizontal", df.label))
    with pytest.raises(TrainError, match="projection 'lda'.*at least 2 classes"):
        fit(tmp_path / "lda", one_class, projection="lda")
