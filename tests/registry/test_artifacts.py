"""What a run leaves in MLflow: weights as safetensors, no pickle of project objects, no secrets in params or tags.

One real pipeline publish (log the run, the pyfunc model, register, gate) whose config holds credentials in URIs;
then the logged model's files and every param and tag of the store are inspected, and the store's database file
itself is searched for the secrets.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import mlflow
from crossmodal.registry import tracking
from crossmodal.registry.publish import publish

SECRETS = ("hunter2", "SIGSECRET", "TOKSECRET", "rootpass", "ROOTTOK")
PICKLE_SUFFIXES = (".pkl", ".pickle", ".pt", ".pth", ".joblib", ".cloudpickle")


@pytest.fixture(scope="module")
def published(tiny_run, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("artifacts")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    cfg = tiny_run["cfg"].model_copy(deep=True)
    cfg.mlflow.tracking_uri = uri
    cfg.mlflow.artifact_root = str(tmp / "artifacts")
    # Where the data lives, as a user might write it: with credentials inside (these values are only logged).
    cfg.data.manifest = "s3://AKIAEXAMPLE:hunter2@bucket/manifest.csv?X-Amz-Signature=SIGSECRET&token=TOKSECRET"
    cfg.data.data_root = "https://reader:rootpass@files.example.com/data?access_token=ROOTTOK"
    try:
        summary = publish(cfg, tiny_run["manifest"], tiny_run["validated_dir"], tiny_run["models"],
                          tiny_run["reports"])
        yield {"summary": summary, "db": tmp / "mlflow.db", "tmp": tmp, "cfg": cfg}
    finally:
        mlflow.set_tracking_uri(None)
        if old is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old


def test_logged_model_holds_no_pickle(published):
    summary = published["summary"]
    name, version = summary["mlflow"]["model_name"], summary["mlflow"]["version"]
    mlflow.set_tracking_uri(f"sqlite:///{published['db']}")
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(published["tmp"] / "dl")))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert files
    assert not [p for p in files if p.suffix.lower() in PICKLE_SUFFIXES], files
    for p in files:  # also by content: a pickle starts with the PROTO opcode 0x80 and a protocol number 2..5
        head = p.read_bytes()[:2]
        assert not (len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5), p
    assert [p.name for p in files if p.suffix == ".safetensors"], "head weights are not safetensors"
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    flavor = mlmodel["flavors"]["python_function"]
    # Models-from-code: MLflow runs pyfunc_entry.py (which imports the class) instead of unpickling an object
    # (the pickled form would be a python_model.pkl named by a "python_model" key).
    assert flavor["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(flavor["model_code_path"]).name == "pyfunc_entry.py" and (local / "pyfunc_entry.py").is_file()
    assert "python_model" not in flavor
    # The whole package travels with the model (code_paths), so it loads where crossmodal is not installed.
    code = local / "code" / "crossmodal"
    for module in ("serving/fused_model.py", "heads/registry.py", "features/extractor.py", "errors.py"):
        assert (code / module).is_file(), module


def test_no_secret_in_params_tags_or_store(published):
    client = MlflowClient(f"sqlite:///{published['db']}")
    values = []
    for exp in client.search_experiments():
        for run in client.search_runs([exp.experiment_id]):
            values += list(run.data.params.items()) + list(run.data.tags.items())
    name = published["summary"]["mlflow"]["model_name"]
    values += list((client.get_registered_model(name).tags or {}).items())
    for mv in client.search_model_versions(f"name = '{name}'"):
        values += list((mv.tags or {}).items())
    params = dict(v for v in values)
    assert params["data.manifest"] == "s3://***@bucket/manifest.csv?X-Amz-Signature=***&token=***"
    assert params["data.data_root"] == "https://***@files.example.com/data?access_token=***"
    leaks = [(k, v) for k, v in values if any(s in f"{k}={v}" for s in SECRETS)]
    assert not leaks, leaks
    raw = published["db"].read_bytes()
    assert not [s for s in SECRETS if s.encode() in raw]  # not anywhere in the tracking database


@pytest.mark.parametrize("raw,clean", [
    ("https://user:secret@host:5000/x", "https://***@host:5000/x"),
    ("sqlite:///a/b.db", "sqlite:///a/b.db"),
    ("s3://b/k?X-Amz-Credential=AKIA&X-Amz-Signature=abc&X-Amz-Date=1", "s3://b/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=1"),
    ("https://acct.blob.core.windows.net/c?sv=1&sig=abc", "https://acct.blob.core.windows.net/c?sv=1&sig=***"),
    ("postgresql://admin:pw@db:5432/mlflow", "postgresql://***@db:5432/mlflow"),
    ("see http://a:b@h/x and ftp://c@d/y", "see http://***@h/x and ftp://***@d/y"),
    ("data/demo/manifest.csv", "data/demo/manifest.csv"),
])
def test_redact_uri(raw, clean):
    assert tracking.redact_uri(raw) == clean


def test_redact_params_by_key_name():
    out = tracking.redact_params({"hub.token": "abc", "db.password": "pw", "x.api_key": "k", "s3.secret_access_key": "s",
                                  "data.columns.id": "id", "train.lr": "0.001", "auth.token": "None"})
    assert out == {"hub.token": "***", "db.password": "***", "x.api_key": "***", "s3.secret_access_key": "***",
                   "data.columns.id": "id", "train.lr": "0.001", "auth.token": "None"}
