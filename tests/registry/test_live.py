"""The pipeline's MLflow run while it runs: RUNNING from the start, epochs logged live, system metrics, FAILED."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from crossmodal.config import from_dict
from crossmodal.registry.live import LiveRun
from crossmodal.training.progress import epoch_writer


@pytest.fixture
def cfg(mlflow_store, tmp_path):
    return from_dict({"mlflow": {"tracking_uri": mlflow_store, "artifact_root": str(tmp_path / "artifacts"),
                                 "experiment": "live"}})


def test_run_is_live_with_context_tags_and_epochs_as_they_come(cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    client = MlflowClient()
    with LiveRun(cfg, tmp_path / "manifest.csv", "live-run", tmp_path / "progress") as live:
        run = client.get_run(live.run_id)
        assert run.info.status == "RUNNING"
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.type"] == "LOCAL"
        assert run.data.params["train.max_epochs"] == str(cfg.train.max_epochs)
        write = epoch_writer(tmp_path / "progress", "concat")
        write({"epoch": 1, "train_loss": 1.0, "val_macro_f1": 0.4})
        live.flush()
        nested = live.head_runs["concat"]
        assert [m.value for m in client.get_metric_history(nested, "epoch_val_macro_f1")] == [0.4]
        write({"epoch": 2, "train_loss": 0.5, "val_macro_f1": 0.6})
        live.flush()
        steps = [(m.step, m.value) for m in client.get_metric_history(nested, "epoch_val_macro_f1")]
        assert steps == [(1, 0.4), (2, 0.6)]
        assert client.get_run(nested).data.tags["mlflow.parentRunId"] == live.run_id
        import time

        # The sampler thread logs every 0.2 s once it is up; on a busy 2-core machine its first sample can take
        # more than a second, so wait for it (up to 30 s) instead of sleeping a fixed time.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if any(k.startswith("system/") for k in client.get_run(live.run_id).data.metrics):
                break
            time.sleep(0.2)
    run = client.get_run(live.run_id)
    assert run.info.status == "FINISHED"
    assert any(k.startswith("system/") for k in run.data.metrics), sorted(run.data.metrics)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags.get("mlflow.experimentKind") == "custom_model_development"


def test_a_failing_block_marks_the_run_failed_with_the_error(cfg, tmp_path):
    client = MlflowClient()
    with pytest.raises(RuntimeError, match="disk on fire"):
        with LiveRun(cfg, tmp_path / "manifest.csv", "doomed", tmp_path / "progress", system_metrics=False) as live:
            epoch_writer(tmp_path / "progress", "gated")({"epoch": 1, "val_macro_f1": 0.3})
            live.flush()
            raise RuntimeError("disk on fire")
    run = client.get_run(live.run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["crossmodal.error"] == "disk on fire"
    assert run.data.tags["crossmodal.error_type"] == "RuntimeError"
    assert client.get_run(live.head_runs["gated"]).info.status == "FAILED"
