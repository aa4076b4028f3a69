"""The fused model (crossmodal.serving.fused_model) of the tiny run's best head: predictions from image paths and
from image bytes agree, and bad input is refused with a clear message."""

import json

import pandas as pd
import pytest

from crossmodal.errors import PredictionInputError
from crossmodal.serving.fused_model import FusedModel
from crossmodal.serving.package import save_model_dir


def test_fused_model_predicts_from_paths_and_bytes(tiny_run, tmp_path, tiny_test_rows):
    best = tiny_run["metrics"]["best_head"]
    folder = save_model_dir(tiny_run["models"], best, tiny_run["cfg"].encoders, tmp_path / "m")
    model = FusedModel.load(folder, allowed_image_root=str(tiny_run["manifest"].parent))
    rows = tiny_test_rows().head(4)
    by_path = model.predict(pd.DataFrame({"image": rows["image"].tolist(), "text": rows["text"].tolist()}))
    as_bytes = [open(p, "rb").read() for p in rows["image"]]
    by_bytes = model.predict(pd.DataFrame({"image_bytes": as_bytes, "text": rows["text"].tolist()}))
    labels = json.loads((tiny_run["models"] / "labels.json").read_text())
    assert list(by_path.columns) == ["label"] + [f"prob_{c}" for c in labels]
    assert by_path["label"].isin(labels).all()
    assert by_path.filter(like="prob_").sum(axis=1).round(5).eq(1).all()
    pd.testing.assert_frame_equal(by_path, by_bytes)


def test_fused_model_rejects_bad_input_clearly(tiny_run, tmp_path, tiny_test_rows):
    best = tiny_run["metrics"]["best_head"]
    model = FusedModel.load(save_model_dir(tiny_run["models"], best, tiny_run["cfg"].encoders, tmp_path / "m"),
                            allowed_image_root=str(tiny_run["manifest"].parent))
    with pytest.raises(PredictionInputError, match="'text' column"):
        model.predict(pd.DataFrame({"photo": ["a.jpg"]}))
    with pytest.raises(PredictionInputError, match="row 1: no image and no text"):
        img = tiny_test_rows()["image"].iloc[0]
        model.predict(pd.DataFrame({"image": [img, None], "text": ["a", None]}))
    with pytest.raises(PredictionInputError, match="row 0: 'text' must be a string"):
        model.predict(pd.DataFrame({"text": [3]}))
