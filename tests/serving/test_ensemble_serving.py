"""An ensemble whose members read other inputs than the frozen features (``train.ensemble.pool: all``): saved with
its members' folders, its predictions theirs pooled (each at its temperature); served from raw rows
(crossmodal.serving.fused_model.EnsembleFusedModel) as training predicted them, as the registered pyfunc, and by
``crossmodal predict`` with drift in the frozen encoders' space."""

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crossmodal.errors import PredictionInputError
from crossmodal.heads.averaged import EnsembleChoice
from crossmodal.serving.fused_model import EnsembleFusedModel, FusedModel
from crossmodal.serving.package import save_model_dir
from crossmodal.training.ensemble import save_model_ensemble

WEIGHTS = {"gated": 0.5, "cnn_rnn": 0.25, "finetune_xattn": 0.25}
# Temperatures other than 1 on each kind of member, so serving must apply each one where training did.
CHOICE = EnsembleChoice(WEIGHTS, {"gated": 1.6, "cnn_rnn": 0.7, "finetune_xattn": 1.3}, "log_mean")


def _npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as npz:
        return {k: npz[k] for k in npz.files}


@pytest.fixture(scope="module")
def mixed(tiny_run, tmp_path_factory):
    """The tiny run's gated, cnn_rnn and finetune_xattn heads saved as one ensemble, in a models folder of its own."""
    models = tmp_path_factory.mktemp("mixed") / "models"
    models.mkdir()
    for name in WEIGHTS:
        shutil.copytree(tiny_run["models"] / name, models / name)
    shutil.copy(tiny_run["models"] / "labels.json", models / "labels.json")
    labels = json.loads((models / "labels.json").read_text())
    summary = save_model_ensemble(models, CHOICE, [{"epoch": 1, "members": WEIGHTS}], labels, tiny_run["cfg"].train,
                                  0.5)
    return models, summary


def test_an_ensemble_without_frozen_members_embeds_for_drift_alone(tiny_run, tiny_test_rows, tmp_path):
    models = tmp_path / "models"
    weights = {"cnn_rnn": 0.5, "finetune_xattn": 0.5}
    for name in weights:
        shutil.copytree(tiny_run["models"] / name, models / name)
    shutil.copy(tiny_run["models"] / "labels.json", models / "labels.json")
    choice = EnsembleChoice(weights, {"cnn_rnn": 1.0, "finetune_xattn": 1.0})  # the plain mean (greedy's mix)
    save_model_ensemble(models, choice, [{"epoch": 1}], json.loads((models / "labels.json").read_text()),
                        tiny_run["cfg"].train, 0.1)
    model = FusedModel.load(save_model_dir(models, "ensemble", tiny_run["cfg"].encoders, tmp_path / "m"))
    assert set(model.parts) == {"cnn_rnn", "finetuned"}
    rows = tiny_test_rows(4)
    pred = _npz(models / "ensemble" / "predictions.npz")
    order = [list(pred["test_ids"]).index(i) for i in rows["id"]]
    proba, _, img, txt = model.score(rows["image"].tolist(), rows["text"].tolist(), embeddings=True)
    np.testing.assert_allclose(proba, pred["test_proba"][order], atol=1e-3)
    assert img.shape == (4, model.extractor.image_dim) and txt.shape == (4, model.extractor.text_dim)


def _geometric_mix(models: Path, key: str) -> np.ndarray:
    """The weighted geometric mean of the members' probabilities, each at its temperature, normalised per row (an
    underflowed float32 probability read as the smallest float32)."""
    tiny = np.finfo(np.float32).tiny
    log = sum(w / CHOICE.temperatures[n] * np.log(np.maximum(_npz(models / n / "predictions.npz")[key], tiny))
              for n, w in WEIGHTS.items())
    mix = np.exp(log - log.max(axis=1, keepdims=True))
    return mix / mix.sum(axis=1, keepdims=True)


def test_the_saved_ensemble_pools_its_members_predictions(mixed):
    models, summary = mixed
    assert summary["head"] == "ensemble" and 0 <= summary["val_macro_f1"] <= 1
    meta = json.loads((models / "ensemble" / "head.json").read_text())
    assert meta["family"] == "ensemble" and meta["init_args"]["members"] == WEIGHTS
    assert meta["init_args"]["temperatures"] == CHOICE.temperatures and meta["init_args"]["pooling"] == "log_mean"
    assert sorted(p.name for p in (models / "ensemble" / "members").iterdir()) == sorted(WEIGHTS)
    assert not (models / "ensemble" / "members" / "gated" / "predictions.npz").exists()
    saved = _npz(models / "ensemble" / "predictions.npz")
    for key in ("val_proba", "test_proba", "test_proba_missing_text", "test_proba_missing_image"):
        np.testing.assert_allclose(saved[key], _geometric_mix(models, key), atol=1e-5)
    np.testing.assert_array_equal(saved["test_ids"], _npz(models / "gated" / "predictions.npz")["test_ids"])


def test_served_from_raw_rows_as_training_predicted(mixed, tiny_run, tiny_test_rows, tmp_path):
    models, _ = mixed
    model = FusedModel.load(save_model_dir(models, "ensemble", tiny_run["cfg"].encoders, tmp_path / "m"))
    assert isinstance(model, EnsembleFusedModel) and set(model.parts) == {"frozen", "cnn_rnn", "finetuned"}
    rows = tiny_test_rows(6)
    pred = _npz(models / "ensemble" / "predictions.npz")
    order = [list(pred["test_ids"]).index(i) for i in rows["id"]]
    images = [Path(p).read_bytes() for p in rows["image"]]
    texts = rows["text"].tolist()
    # The fine-tuned member runs in bf16 on a CPU (as in its own serving test: 2e-3); a quarter of its weight here.
    out = model.predict(pd.DataFrame({"image_bytes": images, "text": texts}))
    np.testing.assert_allclose(out.filter(like="prob_").to_numpy(), pred["test_proba"][order], atol=1e-3)
    np.testing.assert_allclose(model.predict_proba(images, None), pred["test_proba_missing_text"][order], atol=1e-3)
    np.testing.assert_allclose(model.predict_proba(None, texts), pred["test_proba_missing_image"][order], atol=1e-3)
    explained = model.predict(pd.DataFrame({"image_bytes": images[:2], "text": texts[:2]}), attribution=True)
    assert list(explained.columns)[-2:] == ["attr_image", "attr_text"]
    assert np.isfinite(explained[["attr_image", "attr_text"]].to_numpy()).all()
    with pytest.raises(PredictionInputError, match="row 0: no image and no text"):
        model.predict_proba([None], ["  "])
    with pytest.raises(PredictionInputError, match="not a decodable image"):
        model.predict_proba([b"not an image"], ["text"])
    with pytest.raises(TypeError, match="word pieces or pixels"):
        model.proba_from_features(np.zeros((1, 4)), np.zeros((1, 4)))


def test_registered_ensemble_serves_the_pyfunc_and_predict(mixed, serves_as_trained):
    serves_as_trained(mixed[0], "ensemble", atol=1e-3)
