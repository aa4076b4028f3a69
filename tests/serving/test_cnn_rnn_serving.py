"""The cnn_rnn head served from raw rows (crossmodal.serving.fused_model.CnnRnnFusedModel): image bytes + texts give
the probabilities training wrote for the same rows, absent modalities included; logged as the pyfunc and
registered, ``crossmodal predict`` scores a manifest with it and checks drift in the frozen encoders' space."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crossmodal.errors import PredictionInputError
from crossmodal.serving.fused_model import CnnRnnFusedModel, FusedModel
from crossmodal.serving.package import save_model_dir


def _trained(tiny_run) -> dict[str, np.ndarray]:
    with np.load(tiny_run["models"] / "cnn_rnn" / "predictions.npz") as npz:
        return {k: npz[k] for k in npz.files}


def test_served_model_predicts_raw_rows_as_training_did(tiny_run, tiny_test_rows, tmp_path):
    model = FusedModel.load(save_model_dir(tiny_run["models"], "cnn_rnn", tiny_run["cfg"].encoders, tmp_path / "m"))
    assert isinstance(model, CnnRnnFusedModel)
    rows = tiny_test_rows()
    pred = _trained(tiny_run)
    order = [list(pred["test_ids"]).index(i) for i in rows["id"]]
    images = [Path(p).read_bytes() for p in rows["image"]]
    texts = rows["text"].tolist()

    out = model.predict(pd.DataFrame({"image_bytes": images, "text": texts}))
    labels = json.loads((tiny_run["models"] / "labels.json").read_text())
    assert list(out.columns) == ["label"] + [f"prob_{c}" for c in labels]
    np.testing.assert_allclose(out.filter(like="prob_").to_numpy(), pred["test_proba"][order], atol=1e-5)
    # Without text the image branch decides, without image the text branch: as training predicted them.
    np.testing.assert_allclose(model.predict_proba(images, None), pred["test_proba_missing_text"][order], atol=1e-5)
    np.testing.assert_allclose(model.predict_proba(None, texts), pred["test_proba_missing_image"][order], atol=1e-5)

    explained = model.predict(pd.DataFrame({"image_bytes": images[:3], "text": texts[:3]}), attribution=True)
    assert list(explained.columns)[-2:] == ["attr_image", "attr_text"]
    with pytest.raises(PredictionInputError, match="row 0: no image and no text"):
        model.predict_proba([None], ["  "])
    with pytest.raises(PredictionInputError, match="not a decodable image"):
        model.predict_proba([b"not an image"], ["text"])
    with pytest.raises(TypeError, match="word pieces"):
        model.proba_from_features(np.zeros((1, 4)), np.zeros((1, 4)))


def test_registered_model_serves_the_pyfunc_and_predict(tiny_run, serves_as_trained):
    serves_as_trained(tiny_run["models"], "cnn_rnn", atol=1e-5)
