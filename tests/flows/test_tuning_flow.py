"""`crossmodal tune` end to end on the tiny demo data: the Prefect flow's trials, their nested MLflow runs under one
parent, the tuned.yaml it writes, and a following train that reads it and trains each head with its own settings."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file
from typer.testing import CliRunner

from crossmodal.artifacts import HEAD_FILE, WEIGHTS_FILE
from crossmodal.cli import app
from crossmodal.config import load_config


def _features(root: Path, n: int = 120):
    """validated.parquet and two small feature arrays that tell three labels apart (splits train/val/test in turn)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    root.mkdir(parents=True, exist_ok=True)
    paths = root / "validated.parquet", root / "image.npy", root / "text.npy"
    pd.DataFrame({"id": [f"id{i}" for i in range(n)], "label": [f"c{k}" for k in y],
                  "split": np.array(["train", "val", "test"])[np.arange(n) % 5 % 3]}).to_parquet(paths[0])
    np.save(paths[1], (rng.normal(size=(n, 8)) + 2 * np.eye(3, 8)[y]).astype(np.float32))
    np.save(paths[2], (rng.normal(size=(n, 5)) + 2 * np.eye(3, 5)[y]).astype(np.float32))
    return paths


def test_the_search_takes_turns_starts_from_the_current_settings_and_repeats_itself(prefect_api, tmp_path):
    from prefect import flow

    from crossmodal.config import OrchestrationConfig, from_dict
    from crossmodal.training.tuning import tuning_job
    from flows.execution import Execution
    from flows.tuning import search

    train = from_dict({"train": {"max_epochs": 4, "patience": 2, "hidden_dim": 24, "lr": 0.002}}).train
    job = tuning_job(*_features(tmp_path), train)

    heard: list = []  # what on_trial heard; a flow's parameters are copies, so it is not passed as one

    @flow(name="search-test")
    def searched() -> dict:
        with Execution(OrchestrationConfig(task_runner="threads", workers=2)) as ex:
            return search(ex, job, train, ["concat", "text_only"], trials=3, on_trial=heard.append)

    first, again = searched(), searched()
    assert [(r["head"], r["number"]) for r in heard] == 2 * [("concat", 0), ("text_only", 0), ("concat", 1)]
    assert all(r["seconds"] >= 0 and r["worker"] == "local" for r in heard)
    assert heard[0]["params"]["lr"] == 0.002 and heard[0]["params"]["hidden_dim"] == 24  # the current settings
    assert first["heads"]["concat"]["trials"] == 2 and first["heads"]["text_only"]["trials"] == 1
    assert first["heads"]["concat"]["default"] == heard[0]["value"]
    assert first["heads"]["concat"]["best"] >= first["heads"]["concat"]["default"]
    # Seeded sampler, results told in the order asked, seeded training: the same search twice is the same search.
    assert [(r["params"], r["value"], r["pruned"]) for r in first["results"]] == \
        [(r["params"], r["value"], r["pruned"]) for r in again["results"]]


@pytest.mark.slow
def test_tune_writes_a_params_file_that_train_uses_and_logs_each_trial(prefect_api, demo_dir, tmp_path,
                                                                     monkeypatch, tiny_config):
    from crossmodal.features.extract import extract_features
    from flows.training import run_train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # hidden_dim 24 is in no searched list, so a tuned size other than the current one is the search's doing.
    cfg = tiny_config(tmp_path, train={"heads": ["image_only", "text_only", "concat"], "max_epochs": 8,
                                       "hidden_dim": 24})
    cfg.data.manifest = str(demo_dir / "manifest.csv")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump()))
    out = tmp_path / "tuned.yaml"

    result = CliRunner().invoke(app, ["tune", "--params", str(params), "--trials", "4", "--heads", "concat,text_only",
                                      "--out", str(out), "--plain"])
    assert result.exit_code == 0, result.output
    assert "val macro-F1 before" in result.output and "wrote" in result.output
    assert result.output.count("#") >= 4  # a line per finished trial: "concat #1  val macro-F1 ..."

    # tuned.yaml: the configuration read, with each tuned head's best settings, and a header saying which study.
    text = out.read_text()
    assert text.startswith("# crossmodal tune") and "run " in text.splitlines()[1]
    tuned = load_config(out)
    assert set(tuned.train.head_params) == {"concat", "text_only"}
    assert tuned.data.manifest == cfg.data.manifest and tuned.train.heads == cfg.train.heads

    # MLflow: one parent run in <experiment>-tune, a nested run per trial with its settings and per-epoch curve.
    client = MlflowClient(cfg.mlflow.tracking_uri)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment + "-tune")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0]
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(nested) == 4
    assert sorted(r.data.tags["crossmodal.head"] for r in nested) == ["concat", "concat", "text_only", "text_only"]
    assert {r.data.tags["crossmodal.trial_state"] for r in nested} <= {"complete", "pruned"}
    for run in nested:
        assert {"lr", "dropout", "batch_size", "patience", "hidden_dim"} <= set(run.data.params)
        curve = client.get_metric_history(run.info.run_id, "epoch_val_macro_f1")
        assert [m.step for m in curve] == list(range(1, len(curve) + 1)) and curve
    complete = [r for r in nested if r.data.tags["crossmodal.trial_state"] == "complete"]
    best = max((r for r in complete if r.data.tags["crossmodal.head"] == "concat"),
               key=lambda r: (r.data.metrics["val_macro_f1"], -int(r.data.tags["crossmodal.trial"])))
    concat = tuned.train.head_params["concat"].model_dump(exclude_none=True)
    assert {k: str(v) for k, v in concat.items()} == {k: best.data.params[k] for k in concat}
    assert parent.data.params["best.concat.lr"] == str(concat["lr"])
    assert parent.data.metrics["best_val_macro_f1.concat"] == best.data.metrics["val_macro_f1"]
    assert parent.data.metrics["best_val_macro_f1.concat"] >= parent.data.metrics["default_val_macro_f1.concat"]
    assert [a.path for a in client.list_artifacts(parent.info.run_id)] == ["tuned.yaml"]

    # A train that reads tuned.yaml trains concat and text_only with their own settings, image_only with the
    # train section's.
    validated = next(Path(cfg.paths.work).glob("tune/*/validated/validated.parquet"))
    feats = extract_features(validated, cfg.encoders, Path(cfg.paths.cache))  # from the store: nothing encoded
    assert feats.encoded == {"image": 0, "text": 0}
    run_train(str(validated), str(feats.image_path), str(feats.text_path), str(tmp_path / "models"), str(out))
    for head, hidden in (("concat", concat.get("hidden_dim", 24)),
                         ("text_only", tuned.train.for_head("text_only").hidden_dim), ("image_only", 24)):
        info = json.loads((tmp_path / "models" / head / HEAD_FILE).read_text())
        assert info["init_args"]["hidden_dim"] == hidden, head
        first = next(v for k, v in load_file(str(tmp_path / "models" / head / WEIGHTS_FILE)).items()
                     if k.endswith("weight") and v.ndim == 2)
        assert first.shape[0] == hidden, head
    assert info["config"]["head_params"]["concat"]["lr"] == concat["lr"]
