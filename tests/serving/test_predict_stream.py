"""Batch prediction through FusedModel streams its input: chunks of PREDICT_CHUNK rows, same answers, right row
numbers in errors."""

from __future__ import annotations

import os

import pandas as pd
import pytest

from crossmodal.errors import PredictionInputError
from crossmodal.serving import fused_model as fused
from crossmodal.serving import package
from crossmodal.serving.fused_model import FusedModel


def test_batch_prediction_streams_in_chunks(tiny_run, tmp_path, monkeypatch):
    folder = package.save_model_dir(tiny_run["models"], "concat", tiny_run["cfg"].encoders, tmp_path / "fused")
    rows = pd.read_parquet(tiny_run["validated_dir"] / "validated.parquet").head(7)
    fm = FusedModel.load(folder, allowed_image_root=os.path.commonpath(rows["image"].tolist()))
    frame = pd.DataFrame({"image": rows["image"].tolist(), "text": rows["text"].tolist()})
    whole = fm.predict(frame)

    sizes, predict_proba = [], fm.predict_proba
    monkeypatch.setattr(fm, "predict_proba", lambda images, texts: sizes.append(len(images)) or
                        predict_proba(images, texts))
    monkeypatch.setattr(fused, "PREDICT_CHUNK", 3)
    streamed = fm.predict(frame)
    assert sizes == [3, 3, 1]
    assert list(streamed.columns) == list(whole.columns) and len(streamed) == 7
    probs = [c for c in whole.columns if c.startswith("prob_")]
    pd.testing.assert_frame_equal(streamed[probs], whole[probs], check_exact=False, atol=2e-2)

    frame = frame.astype({"text": object})
    frame.loc[5, "text"] = 3.5
    with pytest.raises(PredictionInputError, match="row 5: 'text' must be a string"):
        fm.predict(frame)
