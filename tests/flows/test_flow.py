"""The Prefect wiring (flows/): the real training flow end to end on the tiny demo data, with temporary MLflow and
Prefect stores; its schedule; how its runs log and report."""

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from crossmodal.training.progress import ProgressTail, events_dir


def _task_states(flow_run_id):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return {r.name: r.state.name for r in runs}


def test_training_flow_end_to_end(prefect_api, demo_dir, tmp_path, monkeypatch, tiny_config):
    from flows.training import training_flow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_config(tmp_path)
    cfg.data.manifest = str(demo_dir / "manifest.csv")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump()))

    state = training_flow(str(params), return_state=True)
    first = state.result()
    summary = json.loads((tmp_path / "reports" / "summary.json").read_text())
    assert summary["mlflow"]["run_id"] == first["mlflow"]["run_id"]
    for head in cfg.train.heads:
        assert set(summary["heads"][head]) >= {"accuracy", "macro_f1", "roc_auc"}
    assert summary["best_fusion"] not in ("image_only", "text_only")
    assert summary["best_unimodal"] in ("image_only", "text_only")
    assert isinstance(summary["fusion_gain_macro_f1"], float)
    gain = summary["fusion_gain_interval"]["over_unimodal"]
    assert gain["delta"] == summary["fusion_gain_macro_f1"] and gain["ci_low"] <= gain["delta"] <= gain["ci_high"]
    rows = summary["rows"]
    assert rows["in"] == rows["kept"] + rows["quarantined"]
    assert summary["mlflow"]["champion_version"] == "1"
    states = _task_states(state.state_details.flow_run_id)
    assert states["extract"] == "Completed"
    # One task run per head (the Prefect UI's boxes), named for it, and the summary says where each ran.
    assert {f"train-{h}" for h in cfg.train.heads} <= set(states), states
    assert all(states[f"train-{h}"] == "Completed" for h in cfg.train.heads)
    execution = summary["execution"]
    assert execution["task_runner"] == "threads" and execution["workers"] == ["local"]
    ran = {t["name"]: t for t in execution["tasks"]}
    assert {f"train-{h}" for h in cfg.train.heads} | {"validate", "extract", "evaluate", "publish"} <= set(ran)
    assert all(t["worker"] == "local" and t["seconds"] >= 0 for t in execution["tasks"])

    assert not any(rec["cached"] for rec in first["stages"].values()), first["stages"]
    assert first["unchanged"] is False
    validated = pd.read_parquet(rows["validated_file"])
    assert {"id", "label", "split"} <= set(validated.columns) and len(validated) == rows["kept"]
    assert summary["features"]["image"]["encoded"] > 0 and summary["features"]["text"]["reused"] == 0

    # The MLflow run was open while the heads trained: each head's epochs were logged to its nested run as they
    # came (steps are epochs), before publishing finished it.
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    parent = client.get_run(summary["mlflow"]["run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["mlflow.user"]
    nested = client.search_runs([parent.info.experiment_id],
                                filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_head = {r.data.tags["crossmodal.head"]: r for r in nested}
    assert set(by_head) == set(cfg.train.heads)
    concat = client.get_metric_history(by_head["concat"].info.run_id, "epoch_val_macro_f1")
    head_json = Path(first["work_dir"]) / "models" / "concat" / "head.json"
    assert [m.step for m in concat] == [h["epoch"] for h in json.loads(head_json.read_text())["history"]]
    # Opened while the head trained (the watcher polls every second), so before evaluation wrote its report, and
    # not by publishing, which comes after.
    evaluated = Path(first["work_dir"]) / "reports" / "metrics.json"
    assert by_head["concat"].info.start_time < evaluated.stat().st_mtime * 1000

    # A second run with nothing changed: every stage is skipped (Prefect shows each task as Cached), and the identical
    # model is not registered again: version 1 stays champion. (What reruns: tests/pipeline/test_flow_cache.py.)
    state2 = training_flow(str(params), progress_dir=str(tmp_path / "progress"), return_state=True)
    second = state2.result()
    # The stages' events went to the folder the caller chose (what `crossmodal run` shows), each one cached.
    events = [r for _, r in ProgressTail(events_dir(tmp_path / "progress")).poll()]
    assert [(e["stage"], e["state"]) for e in events] == [
        (s, state) for s in ("validate", "extract", "train", "evaluate", "publish") for state in ("started", "cached")]
    states = _task_states(state2.state_details.flow_run_id)
    assert set(states) == {"validate", "plan-extract", "extract", "evaluate", "publish"}  # nothing to train
    assert {k: v for k, v in states.items() if k != "plan-extract"} == dict.fromkeys(set(states) - {"plan-extract"},
                                                                                       "Cached"), states
    assert all(rec["cached"] for rec in second["stages"].values()), second["stages"]
    assert second["unchanged"] is True and second["unchanged_since_version"] == "1"
    assert second["mlflow"]["version"] == "1" and second["mlflow"]["champion_version"] == "1"
    assert second["promotion"]["promoted"] is False and "nothing registered" in second["promotion"]["reason"]
    counts = ("in", "kept", "quarantined")
    assert [second["rows"][k] for k in counts] == [summary["rows"][k] for k in counts]
    assert second["rows"]["quarantine_file"].startswith(second["work_dir"])  # this run's folder shows it
    assert second["heads"] == summary["heads"]


def test_flow_stops_on_bad_data_with_clear_error(prefect_api, tmp_path, tiny_config):
    from crossmodal.errors import DataError
    from flows.training import training_flow

    cfg = tiny_config(tmp_path)
    cfg.data.manifest = str(tmp_path / "nope.csv")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump()))
    with pytest.raises(DataError, match="nope.csv"):
        training_flow(str(params), progress_dir=str(tmp_path / "progress"))
    events = [r for _, r in ProgressTail(events_dir(tmp_path / "progress")).poll()]
    assert [(e["stage"], e["state"]) for e in events] == [("validate", "started"), ("validate", "failed")]
    client = MlflowClient(cfg.mlflow.tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id])
    assert run.info.status == "FAILED" and "nope.csv" in run.data.tags["crossmodal.error"]


def test_schedule_deployment_has_cron_and_timezone():
    from flows.schedule import ScheduleError, build_deployment

    dep = build_deployment("0 3 * * *", "Europe/Paris", "params.yaml")
    assert dep.name == "crossmodal-retrain"
    (sched,) = dep.schedules
    assert sched.schedule.cron == "0 3 * * *" and sched.schedule.timezone == "Europe/Paris"
    assert dep.parameters["params_path"].endswith("params.yaml")
    with pytest.raises(ScheduleError, match="Invalid cron"):
        build_deployment("61 3 * * *")
    with pytest.raises(ScheduleError, match="Invalid timezone"):
        build_deployment("0 3 * * *", "Mars/Base")


@pytest.mark.slow
def test_schedule_serves_against_a_real_prefect_server(tmp_path, free_port):
    """`crossmodal schedule` registers a cron deployment on a real `prefect server` (make test-all)."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_API_URL": api}
    bin_dir = Path(sys.executable).parent
    server = subprocess.Popen([str(bin_dir / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                               str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    serve = None
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        serve = subprocess.Popen([str(bin_dir / "crossmodal"), "schedule", "--cron", "0 3 * * *", "--timezone",
                                  "Europe/Paris", "--params", str(tmp_path / "params.yaml")], env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        found = None
        with temporary_settings(updates={PREFECT_API_URL: api}):
            while time.time() < deadline + 60 and found is None:
                time.sleep(2)
                with get_client(sync_client=True) as client:
                    deps = client.read_deployments()
                found = next((d for d in deps if d.name == "crossmodal-retrain"), None)
        assert found is not None, "deployment never appeared on the server"
        (sched,) = found.schedules
        assert sched.schedule.cron == "0 3 * * *" and sched.schedule.timezone == "Europe/Paris"
    finally:
        for proc in (serve, server):
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()


def test_user_errors_are_logged_without_traceback():
    import logging
    import sys

    import flows.training  # noqa: F401  (installs the filter)
    from crossmodal.errors import HideUserErrorTracebacks, ValidationFailed

    logger = logging.getLogger("prefect.task_runs")
    assert any(isinstance(f, HideUserErrorTracebacks) for f in logger.filters)
    for exc, kept in ((ValidationFailed("too many rows quarantined"), False), (KeyError("a bug"), True)):
        try:
            raise exc
        except Exception:
            record = logger.makeRecord("x", logging.ERROR, __file__, 1, "failed: %r", (exc,), sys.exc_info())
        HideUserErrorTracebacks().filter(record)
        assert (record.exc_info is not None) == kept
        assert "too many rows" in record.getMessage() or kept


def test_a_run_without_a_prefect_server_sends_no_heartbeats(monkeypatch):
    """Heartbeats only matter to a server that outlives the run; without one they cost a second per run."""
    from prefect.settings import get_current_settings, temporary_settings

    import flows.training as training

    seen = []
    monkeypatch.setattr(training, "training_flow", lambda *a: seen.append(get_current_settings().flows.heartbeat_frequency))
    with temporary_settings(updates={"api.url": None}):
        training.run_training()
        training.run_training(heartbeats=True)
    with temporary_settings(updates={"api.url": "http://127.0.0.1:4200/api"}):
        training.run_training()
    assert seen == [None, 180, 180]
