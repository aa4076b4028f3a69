"""The drift reference as an MLflow artifact: logged with the run that logs a model, fetched for a model version.

    from crossmodal.registry.drift_artifact import fetch_drift_reference, log_drift_reference
    log_drift_reference(cfg, "work/validated", run_id, features)   # publish: "drift/drift_reference.npz" in the run
    ref = fetch_drift_reference(run_id)                        # predict: a DriftReference, or None if absent

The embeddings are the train stage's feature arrays: the extraction result's files when the caller passes it (the
flow does), else found again in the feature store (``paths.cache``) by their content keys, so nothing is encoded
when the store holds them (it does right after ``crossmodal extract``; if it was cleared meanwhile, the features
are recomputed and the store refilled). The file's format:
``crossmodal.evaluation.drift_reference``.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any

from crossmodal.artifacts import DRIFT_DIR, DRIFT_REFERENCE_FILE, LABELS_FILE, PREDICTIONS_FILE, VALIDATED_FILE
from crossmodal.config import Config
from crossmodal.evaluation.drift_reference import DriftReference, read_drift_reference, write_drift_reference

log = logging.getLogger(__name__)

ARTIFACT_PATH = f"{DRIFT_DIR}/{DRIFT_REFERENCE_FILE}"


def heldout_predictions(train_dir: str | Path, head: str) -> dict[str, str]:
    """The registered head's predicted label per validation and test row id, from its ``predictions.npz``."""
    import json

    import numpy as np

    labels = json.loads((Path(train_dir) / LABELS_FILE).read_text())
    out: dict[str, str] = {}
    with np.load(Path(train_dir) / head / PREDICTIONS_FILE, allow_pickle=False) as z:
        for split in ("val", "test"):
            for rid, k in zip(z[f"{split}_ids"].tolist(), z[f"{split}_proba"].argmax(axis=1).tolist(), strict=True):
                out[str(rid)] = str(labels[k])
    return out


def log_drift_reference(cfg: Config, validated_dir: str | Path, run_id: str,
                        features: dict[str, Any] | None = None, train_dir: str | Path | None = None,
                        head: str | None = None) -> str:
    """Write the drift reference of the rows in ``validated_dir`` and log it to run ``run_id``; returns its
    artifact path.

    ``features``: the extraction result (``FeatureResult.to_dict()``: ``image_path``, ``text_path``, arrays in
    validated row order) when the caller has it; otherwise the arrays are looked up in the feature store.
    ``train_dir`` and ``head``: where the registered head's held-out predictions are, for the label-mix test.
    """
    from mlflow.tracking import MlflowClient

    validated = Path(validated_dir) / VALIDATED_FILE
    if features and all(Path(features.get(k) or "").is_file() for k in ("image_path", "text_path")):
        image_path, text_path = features["image_path"], features["text_path"]
    else:
        from crossmodal.features.extract import extract_features

        found = extract_features(validated, cfg.encoders, cfg.paths.cache, progress=False)
        if any(found.computed.values()):
            log.warning("drift reference: the feature store %s lacked this run's features; they were recomputed",
                        cfg.paths.cache)
        image_path, text_path = found.image_path, found.text_path
    with tempfile.TemporaryDirectory(prefix="crossmodal-drift-") as tmp:
        path = write_drift_reference(validated, image_path, text_path, Path(tmp) / DRIFT_REFERENCE_FILE,
                                     cfg.encoders, cfg.drift.reference_rows, cfg.drift.seed,
                                     heldout_predictions(train_dir, head) if train_dir and head else None)
        MlflowClient().log_artifact(run_id, str(path), DRIFT_DIR)
    return ARTIFACT_PATH


def fetch_drift_reference(run_id: str | None) -> DriftReference | None:
    """The drift reference logged with run ``run_id``; None when the run has none (a model logged before drift
    references existed) or is gone."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    if not run_id:
        return None
    with tempfile.TemporaryDirectory(prefix="crossmodal-drift-") as tmp:
        try:
            local = MlflowClient().download_artifacts(run_id, ARTIFACT_PATH, tmp)
        except (MlflowException, OSError) as err:
            log.debug("no drift reference in run %s: %s", run_id, err)
            return None
        return read_drift_reference(local)
