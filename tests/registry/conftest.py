"""Fixtures for the registry tests: logging a trained head of the tiny run, and the publish stage run in a separate
process (publish_worker.py, next to this file) that a test can kill or race against another."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]  # the worker runs as ``python -m tests.registry.publish_worker`` from here


@pytest.fixture
def log_head(tiny_run, tiny_test_rows):
    """``log_head(head)``: log one trained head of the tiny run as a pyfunc model in a new MLflow run, with the test
    rows as its input example; returns (model uri, run id)."""
    import mlflow
    from crossmodal.serving.package import log_model

    def log(head: str) -> tuple[str, str]:
        with mlflow.start_run() as run:
            info = log_model(tiny_run["models"], head, tiny_run["cfg"], tiny_test_rows())
        return info.model_uri, run.info.run_id

    return log


@pytest.fixture(scope="session")
def learned_ids(tiny_run) -> list[str]:
    """The ids the tiny run's heads learned from: its train and validation rows."""
    import pandas as pd

    frame = pd.read_parquet(tiny_run["validated_dir"] / "validated.parquet")
    return frame.loc[frame["split"].isin(["train", "val"]), "id"].astype(str).tolist()


@pytest.fixture(scope="session")
def gate_config(tiny_run):
    """``gate_config(**settings)``: the tiny run's promotion settings with ``settings`` changed (validated), e.g.
    ``min_rows=5`` for the tiny run's few test rows."""
    from crossmodal.config import PromotionConfig

    def make(**settings):
        return PromotionConfig.model_validate({**tiny_run["cfg"].promotion.model_dump(), **settings})

    return make


@pytest.fixture
def register_head(log_head, tiny_test_rows, learned_ids, mlflow_store):
    """``register_head(name, head, cfg, learned=None, rows=None, record=True)``: register and gate ``head``
    (crossmodal.registry.promotion.register_and_gate) for a new run, with ``learned`` as the ids it learned from
    (default: the tiny run's train and validation ids), on ``rows`` (default: the tiny run's test rows); returns
    (version, decision, run id). Each head is logged once per test (logging is what takes time) and every
    registration gets a run of its own, which holds its learned ids. ``record=False`` registers as an older
    release did: no run, no learned ids (run id None)."""
    import mlflow
    from crossmodal.registry import promotion

    logged: dict[str, str] = {}

    def register(name: str, head: str, cfg, learned=None, rows=None, record=True):
        if head not in logged:
            logged[head] = log_head(head)[0]
        run_id = None
        if record:
            with mlflow.start_run() as run:
                run_id = run.info.run_id
        version, decision = promotion.register_and_gate(
            logged[head], name, tiny_test_rows() if rows is None else rows, cfg, mlflow_store, run_id=run_id,
            learned_ids=(learned_ids if learned is None else learned) if record else None)
        return version, decision, run_id

    return register


@pytest.fixture
def publish_job(tiny_run, tmp_path):
    """``publish_job(store, name="job", **extra)``: a job file for publish_worker.py: the tiny run's config with
    ``store`` as its tracking URI, its folders, the run name ``name`` and any ``extra`` keys ("force": True)."""
    def write(store: str, name: str = "job", **extra) -> Path:
        cfg = tiny_run["cfg"].model_dump()
        cfg["mlflow"].update(tracking_uri=store, artifact_root=str(tmp_path / "artifacts"))
        job = {"cfg": cfg, "manifest": str(tiny_run["manifest"]), "validated_dir": str(tiny_run["validated_dir"]),
               "models": str(tiny_run["models"]), "reports": str(tiny_run["reports"]), "run_name": name, **extra}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(job, default=str))
        return path

    return write


@pytest.fixture(scope="session")
def publish_worker():
    """``publish_worker(job, *options)``: start publish_worker.py on a job file; stdout and stderr in one text pipe."""
    def start(job: Path, *options: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "tests.registry.publish_worker", "--job", str(job), *options],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    return start
