"""MLflow tracking, registration and publishing (the gate: test_gate.py; promote, rollback and the history:
test_history.py; the fused model they register: tests/serving/test_fused_model.py).

Each test gets its own temporary MLflow store (mlflow_store); the trained heads come from one tiny pipeline run.
"""

import json
import subprocess

import pandas as pd
from mlflow.tracking import MlflowClient

import mlflow
from crossmodal.registry import promotion, tracking
from crossmodal.registry.history import read_history
from crossmodal.registry.learned_ids import LEARNED_IDS_TAG, learned_ids_digest, learned_keys, read_learned_ids
from crossmodal.registry.publish import model_fingerprint, publish, render


def test_publish_logs_runs_registers_and_promotes(tiny_run, mlflow_store, tmp_path, tiny_test_rows):
    cfg = tiny_run["cfg"].model_copy(deep=True)
    cfg.mlflow.tracking_uri = mlflow_store
    cfg.mlflow.artifact_root = str(tmp_path / "artifacts")
    summary = publish(cfg, tiny_run["manifest"], tiny_run["validated_dir"], tiny_run["models"],
                      tiny_run["reports"], tmp_path / "summary.json")
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["mlflow"]["version"] == "1" and saved["mlflow"]["champion_version"] == "1"
    assert saved["promotion"]["promoted"] is True and saved["promotion"]["reason"] == "no champion yet"
    assert {"test", "n_rows", "delta", "ci_low", "ci_high", "p_value", "confidence"} <= set(saved["promotion"])
    assert set(saved["heads"]) == set(cfg.train.heads)
    assert {"stacking", "traditional_text", "traditional_image", "traditional_concat"} <= set(saved["heads"])
    for head, entry in saved["heads"].items():  # the keys scripts read
        assert {"accuracy", "macro_f1", "roc_auc", "ece", "ece_calibrated", "temperature", "family"} <= set(entry)
        expected = ("traditional" if head.startswith("traditional_") else
                    {"finetune_xattn": "finetuned", "linear_probe": "baseline", "ensemble": "ensemble",
                     "cnn_rnn": "rnn"}.get(head, "frozen"))
        assert entry["family"] == expected
        assert 0 <= entry["ece_calibrated"] <= 1 and entry["temperature"] > 0
    assert saved["heads"][saved["registered_head"]]["family"] in ("frozen", "finetuned", "ensemble", "rnn")
    assert saved["best_traditional"].startswith("traditional_")
    rows = saved["rows"]
    assert rows["in"] == rows["kept"] + rows["quarantined"] and rows["quarantined"] > 0

    client = MlflowClient()
    run = client.get_run(summary["mlflow"]["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["crossmodal.gate.promoted"] == "True"
    assert run.data.metrics["rows_in"] == rows["in"]
    assert run.inputs.dataset_inputs, "dataset lineage (mlflow.log_input) missing"
    children = client.search_runs([run.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{run.info.run_id}'")
    assert {c.data.tags["crossmodal.head"] for c in children} == set(cfg.train.heads)
    assert all("test_macro_f1" in c.data.metrics for c in children)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "data")}
    assert {"data/quarantine.csv", "data/validation.json", "data/data_docs"} <= artifacts

    champion = mlflow.pyfunc.load_model(f"models:/{cfg.mlflow.model_name}@champion")
    rows3 = tiny_test_rows().head(3)
    out = champion.predict(pd.DataFrame({"image_bytes": [open(p, "rb").read() for p in rows3["image"]],
                                         "text": rows3["text"].tolist()}))
    assert len(out) == 3 and "label" in out

    # The same model again: nothing is logged or registered, the summary says which version it already is.
    runs_before = len(client.search_runs([run.info.experiment_id]))
    same = publish(cfg, tiny_run["manifest"], tiny_run["validated_dir"], tiny_run["models"], tiny_run["reports"],
                   tmp_path / "summary.json")
    assert same["unchanged"] is True and same["unchanged_since_version"] == "1"
    assert same["mlflow"]["version"] == "1" and same["mlflow"]["champion_version"] == "1"
    assert same["mlflow"]["run_id"] == summary["mlflow"]["run_id"]
    assert same["promotion"]["promoted"] is False
    assert same["promotion"]["reason"] == f"unchanged since version 1 of {cfg.mlflow.model_name}: nothing registered"
    assert set(same) >= set(saved) and set(same["mlflow"]) >= set(saved["mlflow"])  # every key scripts read
    assert set(same["promotion"]) == set(saved["promotion"])
    assert json.loads((tmp_path / "summary.json").read_text())["unchanged"] is True
    assert len(client.search_runs([run.info.experiment_id])) == runs_before
    assert [str(v.version) for v in client.search_model_versions(f"name = '{cfg.mlflow.model_name}'")] == ["1"]
    assert "unchanged since version 1" in render(same)

    # Forced (`crossmodal run --force`): registered again. The tiny run has fewer test rows than promotion.min_rows,
    # so the gate refuses to compare and says so.
    test_rows = len(tiny_test_rows())
    assert test_rows < cfg.promotion.min_rows
    again = publish(cfg, tiny_run["manifest"], tiny_run["validated_dir"], tiny_run["models"], tiny_run["reports"],
                    force=True)
    assert again["mlflow"]["version"] == "2" and again["mlflow"]["champion_version"] == "1"
    assert again["unchanged"] is False
    assert again["promotion"]["promoted"] is False and again["promotion"]["n_rows"] == test_rows
    assert again["promotion"]["reason"].startswith(f"only {test_rows} test rows are unseen by both champion v1 and "
                                                   f"challenger v2 (promotion.min_rows: {cfg.promotion.min_rows})")
    assert "not promoted; crossmodal promote --version 2 --reason" in render(again)
    v2 = client.get_model_version_by_alias(cfg.mlflow.model_name, "challenger")
    assert str(v2.version) == "2"

    # With min_rows within reach: the same data and seed give an equal model, compared on every test row (both
    # learned from the same train and validation rows), exactly no difference: the champion stays.
    cfg.promotion.min_rows = 5
    third = publish(cfg, tiny_run["manifest"], tiny_run["validated_dir"], tiny_run["models"], tiny_run["reports"],
                    force=True)
    decision = third["promotion"]
    assert third["mlflow"]["version"] == "3" and third["mlflow"]["champion_version"] == "1"
    assert (decision["test"], decision["n_rows"], decision["delta"]) == ("paired_bootstrap", test_rows, 0.0)
    assert (decision["ci_low"], decision["ci_high"], decision["p_value"]) == (0.0, 0.0, 1.0)
    assert decision["confidence"] == 0.95 and decision["promoted"] is False
    assert decision["reason"].endswith("not significant: not promoted")
    assert decision["reason"] in render(third)
    run3 = client.get_run(third["mlflow"]["run_id"])
    assert run3.data.metrics["gate_n_rows"] == test_rows and run3.data.metrics["gate_p_value"] == 1.0
    frame = pd.read_parquet(tiny_run["validated_dir"] / "validated.parquet")
    learned = set(learned_keys(frame))  # the train and validation rows' ids, and their contents
    assert set(frame.loc[frame["split"] != "test", "id"].astype(str)) < learned
    assert read_learned_ids(third["mlflow"]["run_id"]) == learned
    assert client.get_model_version(cfg.mlflow.model_name, "3").tags[LEARNED_IDS_TAG] == learned_ids_digest(learned)
    assert [(e["version"], e["action"]) for e in read_history(cfg.mlflow.model_name)] == [("1", "gate")]


def test_tracking_helpers(tmp_path, monkeypatch):
    from crossmodal.config import MlflowConfig

    assert tracking.redact_uri("https://user:secret@host:5000/x") == "https://***@host:5000/x"
    assert tracking.redact_uri("sqlite:///a/b.db") == "sqlite:///a/b.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri(MlflowConfig()) == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.resolve_tracking_uri(MlflowConfig()) == "http://127.0.0.1:5999"
    assert tracking.resolve_tracking_uri(MlflowConfig(tracking_uri="sqlite:///x.db")) == "sqlite:///x.db"


def test_lineage_helpers(tmp_path, monkeypatch):

    assert tracking.git_commit(tmp_path) is None  # not a git repository
    repo = tmp_path / "repo"
    repo.mkdir()
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false"]
    subprocess.run([*git, "init", "-q"], cwd=repo, check=True)
    assert tracking.git_commit(repo) is None  # a repository without a commit
    (repo / "f.txt").write_text("x")
    subprocess.run([*git, "add", "f.txt"], cwd=repo, check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], cwd=repo, check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True)
    assert tracking.git_commit(repo) == head.stdout.strip() and len(head.stdout.strip()) == 40

    monkeypatch.chdir(tmp_path)
    (tmp_path / "shop").mkdir()
    (tmp_path / "shop" / "manifest.csv").write_text("image,text,label\n")
    assert tracking.dvc_hash("shop/manifest.csv") is None
    (tmp_path / "shop.dvc").write_text("outs:\n- md5: abc123.dir\n  path: shop\n")  # what `dvc add shop` writes
    assert tracking.dvc_hash("shop/manifest.csv") == "abc123.dir"
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  make:\n    outs:\n    - path: shop\n      md5: fed.dir\n")
    assert tracking.dvc_hash("shop/manifest.csv") == "fed.dir"  # a pipeline output wins


def test_identical_model_registers_once_even_when_two_runs_race(tiny_run, mlflow_store, tiny_test_rows):
    """The unchanged check is repeated under the gate lock: a run that logged while an identical run registered
    finds that version and registers nothing; with reuse_identical False (--force) it registers."""
    from crossmodal.serving.package import log_model

    name, cfg = "race-test", tiny_run["cfg"].promotion
    with mlflow.start_run():
        uri = log_model(tiny_run["models"], "concat", tiny_run["cfg"], tiny_test_rows()).model_uri
    v1, d1 = promotion.register_and_gate(uri, name, tiny_test_rows(), cfg, mlflow_store, fingerprint="f" * 64,
                                         reuse_identical=True)
    with mlflow.start_run() as run:
        pass
    v, d = promotion.register_and_gate(uri, name, tiny_test_rows(), cfg, mlflow_store, run_id=run.info.run_id,
                                       fingerprint="f" * 64, reuse_identical=True)
    assert (v1, d1.unchanged) == ("1", False)
    assert (v, d.unchanged, d.promoted, d.champion_version) == ("1", True, False, "1")
    assert MlflowClient().get_run(run.info.run_id).data.tags[promotion.UNCHANGED_TAG] == "1"
    assert [str(m.version) for m in MlflowClient().search_model_versions(f"name = '{name}'")] == ["1"]
    v3, d3 = promotion.register_and_gate(uri, name, tiny_test_rows(), cfg, mlflow_store, fingerprint="f" * 64)
    assert (v3, d3.unchanged) == ("2", False)
    assert promotion.identical_version(name, "f" * 64) == "2" and promotion.identical_version(name, "0" * 64) is None


def test_model_fingerprint_is_what_the_model_is_made_of(tiny_run, tmp_path):
    import shutil

    cfg, head = tiny_run["cfg"], "concat"
    models = tmp_path / "models"
    shutil.copytree(tiny_run["models"], models)
    base = model_fingerprint(models, head, cfg, 1.5, "data")
    info = json.loads((models / head / "head.json").read_text())
    info["train_seconds"] = 123.0  # timings of a retrain: not the model
    (models / head / "head.json").write_text(json.dumps(info))
    (models / head / "predictions.npz").write_bytes(b"training-time output")
    assert model_fingerprint(models, head, cfg, 1.5, "data") == base
    assert model_fingerprint(models, head, cfg, 1.25, "data") != base  # calibration is in the model
    assert model_fingerprint(models, head, cfg, 1.5, "other data") != base  # lineage
    weights = models / head / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + bytes([weights.read_bytes()[-1] ^ 1]))
    assert model_fingerprint(models, head, cfg, 1.5, "data") != base
