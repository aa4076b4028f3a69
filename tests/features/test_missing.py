"""Missing modalities in feature extraction: absent images and texts are never encoded, their rows are NaN, and
they are part of the cache key."""

from __future__ import annotations

import numpy as np
import pandas as pd

from crossmodal.features import extractor as embed
from crossmodal.features.extract import extract_features, feature_keys
from crossmodal.validation.validate import validate_manifest


def test_absent_inputs_are_never_encoded(gappy_manifest, tmp_path, monkeypatch, validation_config):
    cfg = validation_config(encoders={"image": {"image_size": 64}}, allow_missing="either")
    res = validate_manifest(gappy_manifest, cfg, tmp_path / "v")
    df = pd.read_parquet(res.validated_path)
    seen = {"image": [], "text": []}
    real_images, real_texts = embed.FeatureExtractor.iter_image_features, embed.FeatureExtractor.iter_text_features

    def spy_images(self, sources, *args, **kwargs):
        seen["image"] += list(sources)
        return real_images(self, sources, *args, **kwargs)

    def spy_texts(self, texts, *args, **kwargs):
        seen["text"] += list(texts)
        return real_texts(self, texts, *args, **kwargs)

    monkeypatch.setattr(embed.FeatureExtractor, "iter_image_features", spy_images)
    monkeypatch.setattr(embed.FeatureExtractor, "iter_text_features", spy_texts)
    feats = extract_features(res.validated_path, cfg.encoders, tmp_path / "cache", progress=False)
    img, txt = np.load(feats.image_path), np.load(feats.text_path)
    assert None not in seen["image"] and None not in seen["text"] and "" not in seen["text"]
    assert len(seen["image"]) == df["image_sha256"].dropna().nunique()
    no_img, no_txt = df["image"].isna().to_numpy(), df["text"].isna().to_numpy()
    assert no_img.sum() == 2 and no_txt.sum() == 2
    assert np.isnan(img[no_img]).all() and np.isfinite(img[~no_img]).all()
    assert np.isnan(txt[no_txt]).all() and np.isfinite(txt[~no_txt]).all()
    # The absent rows are part of the cache key: the same table with those rows complete is another entry.
    filled = df.assign(text=df["text"].fillna("something"))
    assert feature_keys(filled, cfg.encoders, "fp32")["text"] != feature_keys(df, cfg.encoders, "fp32")["text"]
