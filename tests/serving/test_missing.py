"""Missing modalities in serving: the pyfunc model predicts from one modality and explains its predictions on
request; a row with neither is refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mlflow
from crossmodal.errors import PredictionInputError
from crossmodal.serving import package
from crossmodal.serving.fused_model import FusedModel
from crossmodal.serving.package import save_model_dir


def test_pyfunc_predicts_from_one_modality_and_explains_on_request(tiny_run, tiny_test_rows, mlflow_store):
    test = tiny_test_rows().reset_index(drop=True)
    with mlflow.start_run():
        info = package.log_model(tiny_run["models"], "gated", tiny_run["cfg"], test)
    assert info.signature.params.to_dict()[0]["name"] == "attribution"
    model = mlflow.pyfunc.load_model(info.model_uri)
    image_bytes = [Path(test["image"][0]).read_bytes(), None, Path(test["image"][2]).read_bytes()]
    rows = pd.DataFrame({"image_bytes": image_bytes, "text": [test["text"][0], test["text"][1], None]})
    plain = model.predict(rows)
    labels = tiny_run["metrics"]["labels"]
    assert list(plain.columns) == ["label"] + [f"prob_{c}" for c in labels]
    assert plain.filter(like="prob_").sum(axis=1).round(5).eq(1).all()
    explained = model.predict(rows, params={"attribution": True})
    assert list(explained.columns) == list(plain.columns) + ["attr_image", "attr_text", "gate_image", "gate_text"]
    pd.testing.assert_frame_equal(explained[plain.columns], plain)
    assert explained.loc[1, "attr_image"] == pytest.approx(0.0, abs=1e-6)  # no image to remove
    assert explained.loc[2, "attr_text"] == pytest.approx(0.0, abs=1e-6)
    assert (explained[["gate_image", "gate_text"]].sum(axis=1) - 1).abs().max() < 1e-5
    assert np.isfinite(explained[["attr_image", "attr_text"]].to_numpy()).all()
    # Only a text column at all: still a prediction.
    only_text = model.predict(pd.DataFrame({"text": [test["text"][1]]}))
    assert only_text["label"].iloc[0] in labels
    assert only_text.loc[0, "label"] == plain.loc[1, "label"]


def test_fused_model_rejects_rows_with_nothing(tiny_run, tmp_path):
    model = FusedModel.load(save_model_dir(tiny_run["models"], "concat", tiny_run["cfg"].encoders, tmp_path / "m"))
    with pytest.raises(PredictionInputError, match=r"row 1: no image and no text"):
        model.predict(pd.DataFrame({"image": [None, None], "text": ["hello", "   "]}))
    with pytest.raises(PredictionInputError, match="'text' column, an 'image'"):
        model.predict(pd.DataFrame({"caption": ["hello"]}))
