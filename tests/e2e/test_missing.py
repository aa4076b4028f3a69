"""Missing modalities across the stages: the tiny demo chain keeps its row without a caption and scores every
head with and without each modality."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from crossmodal.evaluation.evaluate import evaluate_all
from crossmodal.features.extract import extract_features
from crossmodal.training.train import train_all
from crossmodal.validation.validate import validate_manifest


@pytest.mark.slow
def test_demo_chain_keeps_a_row_without_caption(demo_dir, tmp_path, tiny_config):
    """validate -> extract -> train -> evaluate on the tiny demo with allow_missing=either: its blank-caption
    row is kept, its text features are NaN, and every head is trained and scored with and without each modality."""
    cfg = tiny_config(tmp_path, validation={"allow_missing": "either"}, train={"modality_dropout": 0.3})
    res = validate_manifest(demo_dir / "manifest.csv", cfg, tmp_path / "validated")
    kept = pd.read_parquet(res.validated_path)
    assert "bad-empty-caption" in set(kept["id"]) and res.rows_in == res.rows_kept + res.rows_quarantined
    feats = extract_features(res.validated_path, cfg.encoders, tmp_path / "cache", progress=False)
    row = int(np.flatnonzero(kept["id"].to_numpy() == "bad-empty-caption")[0])
    assert np.isnan(np.load(feats.text_path)[row]).all() and np.isfinite(np.load(feats.image_path)[row]).all()
    train_all(res.validated_path, feats.image_path, feats.text_path, cfg.train, tmp_path / "models")
    metrics = evaluate_all(tmp_path / "models", tmp_path / "reports")
    assert set(metrics["heads"]) == set(cfg.train.heads)
    assert all(m["missing_text"] and m["missing_image"] for m in metrics["heads"].values())
