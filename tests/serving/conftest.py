"""Fixtures for the serving tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import mlflow


@pytest.fixture
def serves_as_trained(tiny_run, tmp_path, mlflow_store):
    """``serves_as_trained(models, head, atol)``: log ``head`` from the folder ``models`` as the project's pyfunc,
    register it with the tiny run's drift reference, and check that the loaded pyfunc and ``crossmodal predict``
    give the test probabilities training wrote, every row in = predicted + refused, and no drift on the training
    data itself. Returns the predict summary."""
    from crossmodal.pipeline.predict import predict_manifest
    from crossmodal.registry.drift_artifact import log_drift_reference
    from crossmodal.serving.package import log_model

    def check(models: Path, head: str, atol: float) -> dict:
        cfg = tiny_run["cfg"].model_copy(deep=True)
        cfg.mlflow.tracking_uri, cfg.mlflow.artifact_root = mlflow_store, str(tmp_path / "artifacts")
        frame = pd.read_parquet(tiny_run["validated_dir"] / "validated.parquet")
        test = frame[frame["split"] == "test"]
        with mlflow.start_run() as run:
            info = log_model(models, head, cfg, test)
        log_drift_reference(cfg, tiny_run["validated_dir"], run.info.run_id)
        version = mlflow.register_model(info.model_uri, cfg.mlflow.model_name,
                                        tags={"crossmodal.run_id": run.info.run_id}).version
        with np.load(models / head / "predictions.npz") as npz:
            ids, expected = list(npz["test_ids"]), npz["test_proba"]

        served = mlflow.pyfunc.load_model(info.model_uri)
        first = test.head(3)
        out = served.predict(pd.DataFrame({"image_bytes": [Path(p).read_bytes() for p in first["image"]],
                                           "text": first["text"].tolist()}))
        order = [ids.index(i) for i in first["id"]]
        np.testing.assert_allclose(out.filter(like="prob_").to_numpy(), expected[order], atol=atol)

        summary = predict_manifest(cfg, tiny_run["manifest"], tmp_path / "p.parquet", version=version,
                                   progress=False)
        assert summary["model"]["head"] == head
        kept = summary["rows"]["predicted"]
        # Every row validation kept is predicted (predict's row checks are training's, less the label checks).
        assert kept >= len(frame) and summary["rows"]["in"] == kept + summary["rows"]["refused"]
        for kind in ("image", "text"):  # embeddings of the frozen encoders: the drift reference's space
            assert summary["drift"][kind]["n"] == kept and not summary["drift"][kind]["drifted"]
        predicted = pd.read_parquet(tmp_path / "p.parquet").set_index("id").loc[ids]
        np.testing.assert_allclose(predicted.filter(like="prob_").to_numpy(), expected, atol=atol)
        return summary

    return check
