"""`crossmodal predict`: the champion on a new manifest: refused rows, predictions like the pyfunc's, drift, MLflow.

One champion per module: the tiny run published (crossmodal.registry.publish, which also logs the drift reference)
into a temporary MLflow store. Batches are made from the tiny run's unseen rows (val + test): copied as they are
(the training distribution), with their images greyscale-inverted (image drift), and with broken rows added.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image, ImageOps
from typer.testing import CliRunner

import mlflow
from crossmodal.artifacts import DRIFT_DIR, DRIFT_REFERENCE_FILE
from crossmodal.cli import app
from crossmodal.errors import DataError, ModelUnavailable
from crossmodal.evaluation.drift_reference import read_drift_reference
from crossmodal.features.extract import extract_features
from crossmodal.pipeline.predict import (
    KIND,
    KIND_TAG,
    PREDICTIONS_EXPERIMENT_SUFFIX,
    Reservoir,
    drift_report,
    predict_manifest,
    render,
)

runner = CliRunner()


@pytest.fixture(scope="module")
def champion(tiny_run, tmp_path_factory):
    """The tiny run published into a store of this module's own: version 1 is champion. Returns its config."""
    from crossmodal.registry.publish import publish

    root = tmp_path_factory.mktemp("predict-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = tiny_run["cfg"].model_copy(deep=True)
    cfg.mlflow.tracking_uri = uri
    cfg.mlflow.artifact_root = str(root / "artifacts")
    params = root / "params.yaml"  # what the CLI reads: this store, the tiny run's settings
    params.write_text(yaml.safe_dump(cfg.model_dump()))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        summary = publish(cfg, tiny_run["manifest"], tiny_run["validated_dir"], tiny_run["models"],
                          tiny_run["reports"])
        assert summary["mlflow"]["champion_version"] == "1"
        yield {"cfg": cfg, "uri": uri, "run_id": summary["mlflow"]["run_id"], "root": root, "params": params}
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def _unseen(tiny_run) -> pd.DataFrame:
    frame = pd.read_parquet(tiny_run["validated_dir"] / "validated.parquet")
    return frame[frame["split"].isin(["val", "test"])].reset_index(drop=True)


def _batch(tiny_run, folder: Path, invert: bool = False, labels: bool = True, bad: bool = False) -> Path:
    """A manifest of the unseen rows with its images copied under ``folder`` (columns key/picture/caption/label
    plus an extra ``note``: every name mapped, nothing at its default)."""
    rows = _unseen(tiny_run)
    (folder / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for k, row in rows.iterrows():
        data = Path(row["image"]).read_bytes()
        if invert:
            img = ImageOps.invert(Image.open(io.BytesIO(data)).convert("L")).convert("RGB")
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            data = buf.getvalue()
        (folder / "img" / f"{k}.png").write_bytes(data)
        records.append({"key": row["id"], "picture": f"img/{k}.png", "caption": row["text"], "label": row["label"],
                        "note": f"n{k}"})
    if bad:
        (folder / "img" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is no jpeg")
        records += [
            {"key": "bad-missing", "picture": "img/nowhere.jpg", "caption": "a photo that is not there",
             "label": "neutral", "note": "x1"},
            {"key": "bad-corrupt", "picture": "img/corrupt.jpg", "caption": "a broken file", "label": "neutral",
             "note": "x2"},
            {"key": "bad-empty-text", "picture": "img/0.png", "caption": " \u200b ", "label": None, "note": "x3"},
            {"key": "bad-no-text", "picture": "img/1.png", "caption": None, "label": None, "note": "x4"},
            {"key": records[0]["key"], "picture": "img/2.png", "caption": "an id seen before", "label": None,
             "note": "x5"},
        ]
    frame = pd.DataFrame.from_records(records)
    if not labels:
        frame = frame.drop(columns=["label"])
    path = folder / "manifest.csv"
    frame.to_csv(path, index=False)
    return path


MAPPING = ["--image-column", "picture", "--text-column", "caption", "--id-column", "key"]


def _cli_predict(champion, manifest: Path, out: Path, *options: str):
    return runner.invoke(app, ["predict", "--manifest", str(manifest), "--out", str(out), "--params",
                               str(champion["params"]), *MAPPING, *options])


def _mapped(champion):
    cfg = champion["cfg"].model_copy(deep=True)
    cfg.data.columns.image, cfg.data.columns.text, cfg.data.columns.id = "picture", "caption", "key"
    return cfg


def _predict(champion, manifest: Path, out: Path, **options):
    return predict_manifest(_mapped(champion), manifest, out, progress=False, **options)


def test_publish_logs_a_drift_reference_of_the_training_rows(champion, tiny_run, tmp_path):
    local = MlflowClient().download_artifacts(champion["run_id"], f"{DRIFT_DIR}/{DRIFT_REFERENCE_FILE}", str(tmp_path))
    ref = read_drift_reference(local)
    frame = pd.read_parquet(tiny_run["validated_dir"] / "validated.parquet")
    train = frame[frame["split"] == "train"]
    assert ref.meta["train_rows"] == len(train) and len(ref.ids) == min(len(train), 2000)
    assert ref.label_counts == train["label"].value_counts().to_dict()
    # The same embeddings the train stage used (the feature store's arrays), row for row.
    feats = extract_features(tiny_run["validated_dir"] / "validated.parquet", champion["cfg"].encoders,
                             champion["cfg"].paths.cache, progress=False)
    assert not any(feats.computed.values())
    position = {rid: k for k, rid in enumerate(frame["id"])}
    rows = [position[i] for i in ref.ids]
    np.testing.assert_array_equal(ref.image, np.load(feats.image_path)[rows])
    np.testing.assert_array_equal(ref.text, np.load(feats.text_path)[rows])


def test_predict_refuses_bad_rows_and_agrees_with_the_pyfunc(champion, tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = _batch(tiny_run, tmp_path / "batch", bad=True)
    out = tmp_path / "out" / "predictions.parquet"
    result = _cli_predict(champion, manifest, out, "--attribution", "--chunk-rows", "16")
    assert result.exit_code == 0, result.output
    assert "predicted" in result.output and "drift (alpha 0.01)" in result.output

    summary = json.loads((out.parent / "predict_summary.json").read_text())
    source = pd.read_csv(manifest)
    rows = summary["rows"]
    assert rows["in"] == len(source) == rows["predicted"] + rows["refused"] and rows["refused"] == 5
    refused = pd.read_csv(rows["refused_file"])
    assert list(refused.columns) == ["_row", "key", "picture", "caption", "label", "note", "reason"]
    why = dict(zip(refused["note"], refused["reason"]))
    assert "image file not found" in why["x1"]
    assert "not a decodable image" in why["x2"] or "corrupt" in why["x2"]
    assert why["x3"].startswith("text is empty") and why["x4"] == "text is missing"
    assert why["x5"].startswith("duplicate id")
    assert refused["reason"].notna().all()

    predicted = pd.read_parquet(out)
    model = mlflow.pyfunc.load_model(f"models:/{champion['cfg'].mlflow.model_name}@champion")
    labels = model.metadata.metadata["labels"]
    assert list(predicted.columns[: 2 + len(labels)]) == ["id", "label"] + [f"prob_{c}" for c in labels]
    assert {"attr_image", "attr_text"} <= set(predicted.columns)
    assert len(predicted) == rows["predicted"] and predicted["id"].is_unique

    # The same rows through the registered pyfunc: the same labels and probabilities (bf16 encoders: to 2e-2).
    good = source[~source["note"].isin(refused["note"])]
    assert predicted["id"].tolist() == good["key"].tolist()
    images = [(manifest.parent / p).read_bytes() for p in good["picture"]]
    expected = model.predict(pd.DataFrame({"image_bytes": images, "text": good["caption"].tolist()}),
                             params={"attribution": True})
    probs = [f"prob_{c}" for c in labels] + ["attr_image", "attr_text"]
    np.testing.assert_allclose(predicted[probs].to_numpy(), expected[probs].to_numpy(), atol=2e-2)
    assert (predicted["label"].to_numpy() == expected["label"].to_numpy()).mean() >= 0.9

    assert set(summary["metrics"]) >= {"accuracy", "macro_f1"} and summary["metrics"]["rows"] == len(good)
    assert summary["model"] == {"name": champion["cfg"].mlflow.model_name, "version": "1",
                                "head": summary["model"]["head"], "run_id": champion["run_id"]}
    assert set(summary["drift"]) >= {"image", "text", "labels"}

    # One MLflow run per batch, in the predictions experiment, with the counts and the drift figures.
    client = MlflowClient(champion["uri"])
    exp = client.get_experiment_by_name(champion["cfg"].mlflow.experiment + PREDICTIONS_EXPERIMENT_SUFFIX)
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.experiment_id == exp.experiment_id and run.info.status == "FINISHED"
    assert run.data.tags[KIND_TAG] == KIND and run.data.tags["crossmodal.model_version"] == "1"
    assert run.data.metrics["rows_refused"] == 5 and run.data.metrics["rows_in"] == rows["in"]
    for key in ("drift_image_statistic", "drift_image_p_value", "drift_text_p_value", "drift_labels_p_value",
                "macro_f1"):
        assert key in run.data.metrics
    assert "predict_summary.json" in {a.path for a in client.list_artifacts(run.info.run_id)}


def test_drift_flags_inverted_images_and_not_the_training_distribution(champion, tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    same = _predict(champion, _batch(tiny_run, tmp_path / "same", labels=False), tmp_path / "same.parquet",
                    chunk_rows=8)
    inverted = _predict(champion, _batch(tiny_run, tmp_path / "inv", invert=True), tmp_path / "inv.parquet")
    print("untouched:", render(same), "inverted:", render(inverted), sep="\n")
    for kind in ("image", "text"):
        assert same["drift"][kind]["drifted"] is False, same["drift"][kind]
        assert same["drift"][kind]["n"] == same["rows"]["predicted"] == len(_unseen(tiny_run))
    assert "metrics" not in same  # no label column: nothing to score against
    assert inverted["drift"]["image"]["drifted"] is True, inverted["drift"]["image"]
    assert inverted["drift"]["text"]["drifted"] is False, inverted["drift"]["text"]
    assert inverted["drift"]["image"]["p_value"] < same["drift"]["image"]["p_value"]
    assert inverted["drift"]["image"]["statistic"] > same["drift"]["image"]["statistic"]


def test_predict_errors_are_one_line(champion, tiny_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    manifest = _batch(tiny_run, tmp_path / "batch")
    out = tmp_path / "p.parquet"
    result = _cli_predict(champion, manifest, out, "--version", "7")
    assert result.exit_code == 2 and "has no version 7 (registered: 1" in result.output
    result = _cli_predict(champion, manifest, out, "--image-column", "photo")
    assert result.exit_code == 2 and "photo" in result.output and "Traceback" not in result.output
    result = _cli_predict(champion, tmp_path / "nothing.csv", out)
    assert result.exit_code == 2 and "not found (--manifest)" in result.output  # checked before any model loads
    assert not out.exists()

    empty = _mapped(champion)
    empty.mlflow.tracking_uri = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(ModelUnavailable, match="no version of .* holds alias champion: run crossmodal run first"):
        predict_manifest(empty, manifest, out, progress=False)
    elsewhere = _mapped(champion)
    elsewhere.data.data_root = str(tmp_path / "absent")
    with pytest.raises(DataError, match="not a directory"):
        predict_manifest(elsewhere, manifest, out, progress=False)
    assert not out.exists()


def test_reservoir_keeps_a_uniform_sample_of_present_rows():
    counts = np.zeros(100)
    for seed in range(300):
        res = Reservoir(10, np.random.default_rng(seed))
        stream = np.arange(100, dtype=np.float32)[:, None].repeat(2, axis=1)
        stream[::10] = np.nan  # rows without the modality are skipped, not sampled
        for start in range(0, 100, 7):
            res.add(stream[start : start + 7])
        assert res.seen == 90 and res.size == 10
        counts[res.sample(2)[:, 0].astype(int)] += 1
    assert counts[::10].sum() == 0
    present = np.delete(counts, np.arange(0, 100, 10))
    assert abs(present.mean() - 300 * 10 / 90) < 1e-9 and present.min() > 10 and present.max() < 60


def test_a_finetuned_version_predicts_and_its_drift_uses_the_frozen_encoders(champion, tiny_run, tmp_path,
                                                                             monkeypatch):
    from crossmodal.registry.drift_artifact import log_drift_reference
    from crossmodal.serving.package import log_model

    monkeypatch.chdir(tmp_path)  # the default experiment keeps its artifacts under ./mlruns
    cfg, name = champion["cfg"], champion["cfg"].mlflow.model_name
    mlflow.set_tracking_uri(champion["uri"])
    mlflow.set_registry_uri(champion["uri"])  # an earlier test may have pointed the registry elsewhere
    with mlflow.start_run() as run:
        info = log_model(tiny_run["models"], "finetune_xattn", cfg, _unseen(tiny_run))
    log_drift_reference(cfg, tiny_run["validated_dir"], run.info.run_id)
    version = str(mlflow.register_model(info.model_uri, name, tags={"crossmodal.run_id": run.info.run_id}).version)

    manifest = _batch(tiny_run, tmp_path / "batch")
    summary = _predict(champion, manifest, tmp_path / "ft.parquet", version=version, chunk_rows=16)
    assert summary["model"]["version"] == version and summary["model"]["head"] == "finetune_xattn"
    assert summary["rows"]["predicted"] == summary["rows"]["in"]
    for kind in ("image", "text"):  # frozen-encoder embeddings, the space of the reference
        assert summary["drift"][kind]["n"] == summary["rows"]["in"] and not summary["drift"][kind]["drifted"]

    source = pd.read_csv(manifest)
    expected = mlflow.pyfunc.load_model(f"models:/{name}/{version}").predict(pd.DataFrame({
        "image_bytes": [(manifest.parent / p).read_bytes() for p in source["picture"]],
        "text": source["caption"].tolist()}))
    predicted = pd.read_parquet(tmp_path / "ft.parquet")
    probs = [c for c in expected.columns if c.startswith("prob_")]
    np.testing.assert_allclose(predicted[probs].to_numpy(), expected[probs].to_numpy(), atol=2e-2)
    assert str(MlflowClient().get_model_version_by_alias(name, "champion").version) == "1"  # predict moves no alias


def test_a_version_without_a_drift_reference_reports_why(tiny_config, tmp_path):
    from collections import Counter

    drift = drift_report(None, None, Counter({"a": 3}), tiny_config(tmp_path), "version 2 of m has no drift reference")
    assert drift == {"image": None, "text": None, "labels": None, "reason": "version 2 of m has no drift reference"}
    summary = {"rows": {"in": 3, "predicted": 3, "refused": 0, "refused_file": "r.csv"},
               "model": {"name": "m", "version": "2", "head": "concat"}, "output": "p.parquet", "drift": drift,
               "summary_file": "s.json"}
    assert "drift: not checked (version 2 of m has no drift reference)" in render(summary)
