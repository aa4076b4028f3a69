"""Shared fixtures: temporary MLflow stores, an ephemeral Prefect API, and one tiny pipeline run on demo data.

Every test that touches MLflow gets its own SQLite store and artifact folder under tmp_path; Prefect runs against
a temporary API server started once per session. Nothing is written to the repository's own mlflow/ or work/.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Prefect keeps its database and persisted task results under PREFECT_HOME: give the session its own, removed at
# exit, so tests never read or write the user's ~/.prefect. Set before Prefect is imported.
_PREFECT_HOME = tempfile.mkdtemp(prefix="crossmodal-test-prefect-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
atexit.register(shutil.rmtree, _PREFECT_HOME, ignore_errors=True)

from crossmodal.environment import set_env_defaults  # noqa: E402

set_env_defaults()  # the offline, quiet defaults, before Prefect reads its settings

from prefect.logging.configuration import setup_logging  # noqa: E402

setup_logging()  # bind Prefect's console handler to the session's stderr now, not to a CliRunner's closed stream
from crossmodal.config import Config, from_dict  # noqa: E402

os.environ.setdefault("MPLBACKEND", "Agg")


def tiny_config(root: Path, **sections) -> Config:
    """A fast configuration: small images, few epochs, stores under ``root``."""
    data = {
        "demo": {"rows": 120, "image_size": 48, "seed": 3, "bad_rows": True},
        "encoders": {"image": {"image_size": 64, "batch_size": 32}, "text": {"max_length": 32}},
        "train": {"max_epochs": 25, "patience": 5, "hidden_dim": 64,
                  "finetune": {"epochs": 1, "max_train_rows": 32, "image_size": 64, "max_length": 16,
                               "batch_size": 16, "model_dim": 32}},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_root": str(root / "artifacts")},
        "paths": {"work": str(root / "work"), "cache": str(root / "cache"), "reports": str(root / "reports"),
                  "summary": str(root / "reports" / "summary.json")},
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    return from_dict(data)


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh MLflow tracking + registry store for one test."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.chdir(tmp_path)  # MLflow's default experiment puts artifacts under ./mlruns
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="session")
def prefect_api():
    """An ephemeral Prefect API server for the session (about 10 s to start here)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    """The embedded demo dataset at test size (120 rows + the deliberately broken ones)."""
    from crossmodal.data.demo import generate_demo

    root = tmp_path_factory.mktemp("demo")
    cfg = tiny_config(root)
    generate_demo(root / "data", cfg.demo)
    return root / "data"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, demo_dir) -> dict:
    """validate -> extract -> train -> evaluate on the tiny demo data, once per session; returns the paths."""
    from crossmodal.evaluation.evaluate import evaluate_all
    from crossmodal.features.extract import extract_features
    from crossmodal.training.train import train_all
    from crossmodal.validation.validate import validate_manifest

    root = tmp_path_factory.mktemp("run")
    cfg = tiny_config(root)
    manifest = demo_dir / "manifest.csv"
    validated = validate_manifest(manifest, cfg, root / "validated")
    feats = extract_features(validated.validated_path, cfg.encoders, root / "cache")
    train_all(validated.validated_path, feats.image_path, feats.text_path, cfg.train, root / "models")
    metrics = evaluate_all(root / "models", root / "reports")
    return {"cfg": cfg, "manifest": manifest, "validated_dir": root / "validated", "models": root / "models",
            "reports": root / "reports", "metrics": metrics, "validation": validated}
