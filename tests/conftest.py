"""Fixtures for every folder: temporary MLflow stores, an ephemeral Prefect API, one tiny pipeline run on demo data,
small configurations, and the writers of images and manifests that the data, validation and features tests share.

Every test that touches MLflow gets its own SQLite store and artifact folder under tmp_path; Prefect runs against
a temporary API server started once per session. Nothing is written to the repository's own mlflow/ or work/.
Helpers are fixtures that return a function (``def test_x(write_csv): write_csv(path, rows)``); no test imports
this file.
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import os
import shutil
import socket
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


# ----------------------------------------------------------------------------- configurations
def _merge(base: dict, overrides: dict) -> dict:
    """``base`` updated with ``overrides``, nested mappings merged key by key."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _tiny_config(root: Path, **sections) -> Config:
    """A fast configuration: small images, few epochs, stores under ``root``; ``sections`` override settings by
    section, nested mappings merged (``train={"finetune": {"epochs": 2}}`` keeps the other fine-tuning settings)."""
    data = {
        "demo": {"rows": 120, "image_size": 48, "seed": 3, "bad_rows": True},
        "encoders": {"image": {"image_size": 64, "batch_size": 32}, "text": {"max_length": 32}},
        "train": {"max_epochs": 25, "patience": 5, "hidden_dim": 64,
                  "finetune": {"epochs": 1, "max_train_rows": 32, "image_size": 64, "max_length": 16,
                               "batch_size": 16, "model_dim": 32}},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}", "artifact_root": str(root / "artifacts")},
        "paths": {"work": str(root / "work"), "cache": str(root / "cache"), "reports": str(root / "reports"),
                  "summary": str(root / "reports" / "summary.json")},
        # In this process: a local Dask cluster's start costs more than these few rows (tests/flows/test_dask.py
        # runs the flow on Dask).
        "orchestration": {"task_runner": "threads"},
    }
    return from_dict(_merge(data, sections))


def _validation_config(encoders: dict | None = None, **validation) -> Config:
    """The defaults with validation settings overridden; up to 90 % of the rows may be quarantined (the bad-row
    manifests are mostly bad rows) and texts are cut at 32 tokens, so the truncation warning is easy to reach.
    ``encoders`` overrides encoder settings (merged into the 32-token text setting)."""
    return from_dict({"validation": {"max_quarantine_fraction": 0.9, **validation},
                      "encoders": _merge({"text": {"max_length": 32}}, encoders or {})})


@pytest.fixture(scope="session")
def tiny_config():
    """``tiny_config(root, **sections)``: the fast configuration of the tiny pipeline run, stores under ``root``."""
    return _tiny_config


@pytest.fixture(scope="session")
def validation_config():
    """``validation_config(encoders=None, **validation)``: a Config for validating small hand-made manifests."""
    return _validation_config


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def stop_process_group():
    """``stop_process_group(proc, timeout=20)``: SIGTERM the process group a test started (``start_new_session``),
    then SIGKILL it if it has not ended within ``timeout`` seconds."""
    import signal
    import subprocess

    def stop(proc, timeout: float = 20) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    return stop


@pytest.fixture(scope="session")
def free_port():
    """``free_port()``: a TCP port on 127.0.0.1 that nothing listens on now."""
    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return free_port


# ----------------------------------------------------------------------------- images and manifests
COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200),
          (120, 60, 10), (10, 60, 120), (90, 90, 90), (250, 250, 250), (5, 5, 5), (140, 200, 90)]


def _image_bytes(i: int = 0, size: tuple[int, int] = (32, 32), fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A small image, different for each ``i`` (so content hashes differ)."""
    from PIL import Image

    img = Image.new("RGB", size, COLORS[i % len(COLORS)])
    img.putpixel((i % size[0], (i // size[0]) % size[1]), (i * 37 % 256, i * 91 % 256, i * 13 % 256))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _write_image(path: Path, i: int = 0, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_image_bytes(i, **kwargs))
    return path


def _good_rows(root: Path, n: int = 8, labels: tuple[str, ...] = ("cat", "dog"), start: int = 0, prefix: str = "ok",
               caption: str = "a picture number {k}") -> list[dict]:
    """``n`` valid rows, ids ``{prefix}{k}`` for k from ``start``, their JPEG images written under ``root/images``
    (``images/{prefix}{k}.jpg``), texts ``caption`` with k filled in; labels alternate."""
    rows = []
    for k in range(start, start + n):
        _write_image(root / "images" / f"{prefix}{k}.jpg", k)
        rows.append({"id": f"{prefix}{k}", "image": f"images/{prefix}{k}.jpg", "text": caption.format(k=k),
                     "label": labels[k % len(labels)]})
    return rows


def _write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    # surrogateescape writes lone surrogates back as the raw (invalid UTF-8) bytes they stand for
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    return path


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def image_bytes():
    """``image_bytes(i=0, size=(32, 32), fmt="JPEG", mode="RGB")``: a small image's bytes, different for each i."""
    return _image_bytes


@pytest.fixture(scope="session")
def write_image():
    """``write_image(path, i=0, **image_bytes_options)``: writes ``image_bytes(i)`` to ``path``; returns the path."""
    return _write_image


@pytest.fixture(scope="session")
def good_rows():
    """``good_rows(root, n=8, labels=("cat", "dog"), start=0, prefix="ok", caption="a picture number {k}")``: valid
    manifest rows with their images written under ``root/images``."""
    return _good_rows


@pytest.fixture(scope="session")
def write_csv():
    """``write_csv(path, rows, columns=None)``: a CSV manifest; None cells are empty."""
    return _write_csv


@pytest.fixture(scope="session")
def write_jsonl():
    """``write_jsonl(path, rows)``: a JSON Lines manifest."""
    return _write_jsonl


@pytest.fixture(scope="session")
def gappy_manifest(tmp_path_factory) -> Path:
    """12 complete rows, and rows whose image, text or both are absent (null, blank or whitespace cells)."""
    root = tmp_path_factory.mktemp("gappy")
    rows = _good_rows(root, 12)
    rows += [
        {"id": "no-image", "image": None, "text": "a caption without a picture", "label": "cat"},
        {"id": "blank-image", "image": "   ", "text": "another lonely caption", "label": "dog"},
        {"id": "no-text", "image": "images/ok1.jpg", "text": None, "label": "dog"},
        {"id": "blank-text", "image": "images/ok2.jpg", "text": " \u200b ", "label": "cat"},
        {"id": "neither", "image": "", "text": "", "label": "cat"},
    ]
    return _write_csv(root / "manifest.csv", rows, ["id", "image", "text", "label"])


# ----------------------------------------------------------------------------- stores and the tiny run
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
    cfg = _tiny_config(root)
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
    cfg = _tiny_config(root)
    manifest = demo_dir / "manifest.csv"
    validated = validate_manifest(manifest, cfg, root / "validated")
    feats = extract_features(validated.validated_path, cfg.encoders, root / "cache")
    train_all(validated.validated_path, feats.image_path, feats.text_path, cfg.train, root / "models")
    metrics = evaluate_all(root / "models", root / "reports")
    return {"cfg": cfg, "manifest": manifest, "validated_dir": root / "validated", "models": root / "models",
            "reports": root / "reports", "metrics": metrics, "validation": validated}


@pytest.fixture(scope="session")
def tiny_test_rows(tiny_run):
    """``tiny_test_rows(n=None)``: the tiny run's validated test rows (the first ``n`` if given), read afresh."""
    import pandas as pd

    def test_rows(n: int | None = None):
        frame = pd.read_parquet(tiny_run["validated_dir"] / "validated.parquet")
        rows = frame[frame["split"] == "test"]
        return rows if n is None else rows.head(n)

    return test_rows
