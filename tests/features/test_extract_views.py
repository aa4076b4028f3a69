"""Augmented views in the feature store (extract_views): K views of the training rows only, found again without
encoding, addressed by content and settings, and equal to the rows' own features when augmentation does nothing."""

import shutil

import numpy as np
import pandas as pd
import pytest

from crossmodal.config import AugmentConfig
from crossmodal.features.extract import extract_features, extract_views

NOTHING = {"image": {"crop_scale": [1.0, 1.0], "flip": False, "color_jitter": 0.0},
           "text": {"token_dropout": 0.0, "deletion": 0.0, "swap": 0.0}}


@pytest.fixture(scope="module")
def store(tiny_run, tmp_path_factory):
    """A copy of the tiny run's feature store (views are added to it), its validated table and encoders."""
    cache = tmp_path_factory.mktemp("views") / "cache"
    shutil.copytree(tiny_run["cfg"].paths.cache, cache)
    validated = tiny_run["validated_dir"] / "validated.parquet"
    return {"cache": cache, "validated": validated, "encoders": tiny_run["cfg"].encoders,
            "df": pd.read_parquet(validated)}


def test_views_of_the_training_rows_are_encoded_once(store):
    augment = AugmentConfig(views=2, frozen=True)
    first = extract_views(store["validated"], store["encoders"], augment, store["cache"])
    n_train = int((store["df"]["split"] == "train").sum())
    image, text = np.load(first.image_path), np.load(first.text_path)
    assert image.shape[:2] == text.shape[:2] == (2, n_train) == (first.views, first.rows)
    assert np.isfinite(image).all() and np.isfinite(text).all()
    assert first.encoded["image"] == 2 * store["df"][store["df"]["split"] == "train"]["image_sha256"].nunique()
    assert not np.allclose(image[0], image[1])
    again = extract_views(store["validated"], store["encoders"], augment, store["cache"])
    assert again.encoded == {"image": 0, "text": 0} and again.image_path == first.image_path
    other = extract_views(store["validated"], store["encoders"], AugmentConfig(views=2, frozen=True, seed=1),
                          store["cache"])
    assert other.image_path != first.image_path and other.encoded["image"] > 0
    assert not np.allclose(np.load(other.image_path), image)


def test_views_that_change_nothing_are_the_rows_own_features(store):
    base = extract_features(store["validated"], store["encoders"], store["cache"], progress=False)
    train = (store["df"]["split"] == "train").to_numpy()
    views = extract_views(store["validated"], store["encoders"], AugmentConfig(views=1, frozen=True, **NOTHING),
                          store["cache"])
    # An unchanged text is the same item as the row's text: found in the store, never encoded again.
    assert views.encoded["text"] == 0
    np.testing.assert_array_equal(np.load(views.text_path)[0], np.load(base.text_path)[train])
    # An image view with every operation off is the whole (square) image resized, as the rows' own features are.
    np.testing.assert_allclose(np.load(views.image_path)[0], np.load(base.image_path)[train], atol=1e-3)


def test_views_are_refused_when_off(store):
    with pytest.raises(ValueError, match="views is 0"):
        extract_views(store["validated"], store["encoders"], AugmentConfig(), store["cache"])
