"""Crashes: a run that dies during training or registration leaves no registered version and no moved alias; an
unreachable tracking server ends in one clear error after MLflow's retries.

Registration writes in an order that makes partial states harmless (see crossmodal.registry.promotion): a version is
registered ``pending``, decided, and only then do aliases move (``champion`` last). A process killed before the
decision leaves a pending version nothing points at, which the next gate deletes; killed after it, the next gate
finishes the alias moves. The default run injects the faults in-process; the slow tests SIGKILL a real process.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

import mlflow
from crossmodal.registry import promotion
from crossmodal.registry.history import read_history


def _heads(tiny_run):
    m = tiny_run["metrics"]["heads"]
    return min(m, key=lambda h: m[h]["test"]["macro_f1"]), max(m, key=lambda h: m[h]["test"]["macro_f1"])


def _state(name):
    client = MlflowClient()
    versions = {str(v.version): (v.tags or {}).get(promotion.STATE_TAG)
                for v in client.search_model_versions(f"name = '{name}'")}
    aliases = {}
    for alias in (promotion.CHAMPION, promotion.CHALLENGER):
        try:
            aliases[alias] = str(client.get_model_version_by_alias(name, alias).version)
        except mlflow.exceptions.MlflowException:
            aliases[alias] = None
    return versions, aliases


# ----------------------------------------------------------------------------- in-process faults (default run)
def test_fault_before_the_decision_leaves_no_version(tiny_run, tiny_test_rows, log_head, mlflow_store):
    name, rows, cfg = "crash-test", tiny_test_rows(), tiny_run["cfg"].promotion
    worst, best = _heads(tiny_run)
    v1, _ = promotion.register_and_gate(log_head(worst)[0], name, rows, cfg, mlflow_store)
    assert _state(name) == ({"1": "complete"}, {"champion": "1", "challenger": "1"})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # what Ctrl-C (or a task cancelled) raises in the middle of scoring

    uri, _ = log_head(best)
    real = promotion.score_version
    promotion.score_version = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            promotion.register_and_gate(uri, name, rows, cfg, mlflow_store)
    finally:
        promotion.score_version = real
    assert _state(name) == ({"1": "complete"}, {"champion": "1", "challenger": "1"})


def test_next_gate_cleans_up_after_a_hard_kill(tiny_run, tiny_test_rows, log_head, mlflow_store):
    """The states a SIGKILL can leave (built directly), and what the next gate's recover() makes of them."""
    name, rows, cfg = "recover-test", tiny_test_rows(), tiny_run["cfg"].promotion
    worst, best = _heads(tiny_run)
    uri_worst, _ = log_head(worst)
    promotion.register_and_gate(uri_worst, name, rows, cfg, mlflow_store)
    client = MlflowClient()

    # Killed right after registering: a pending version, its run still RUNNING.
    uri_best, _ = log_head(best)
    run = client.create_run(mlflow.get_experiment_by_name("Default").experiment_id)
    mlflow.register_model(uri_best, name, tags={promotion.STATE_TAG: "pending", "crossmodal.run_id": run.info.run_id})
    assert _state(name) == ({"1": "complete", "2": "pending"}, {"champion": "1", "challenger": "1"})
    # Killed after the decision (the best head won), before the aliases moved.
    mlflow.register_model(uri_best, name, tags={promotion.STATE_TAG: "decided", promotion.PROMOTED_TAG: "True"})

    with promotion.gate_lock(mlflow_store, 10):
        notes = promotion.recover(name)
    assert len(notes) == 2, notes
    assert _state(name) == ({"1": "complete", "3": "complete"}, {"champion": "3", "challenger": "3"})
    assert client.get_run(run.info.run_id).info.status == "FAILED"
    assert [(e["version"], e["previous"], e["action"]) for e in read_history(name)] == [("1", None, "gate"),
                                                                                         ("3", "1", "gate")]

    # Killed after champion moved and its history entry was written, before the version was marked complete: the
    # next recovery finishes it without recording the move twice.
    client.set_model_version_tag(name, "3", promotion.STATE_TAG, "decided")
    with promotion.gate_lock(mlflow_store, 10):
        assert promotion.recover(name) == ["finished the alias moves of version 3"]
    assert _state(name) == ({"1": "complete", "3": "complete"}, {"champion": "3", "challenger": "3"})
    assert len(read_history(name)) == 2


def test_gate_lock_serialises_processes(tmp_path):
    """Two processes take the gate lock of one store at once: their critical sections never overlap."""
    code = (
        "import sys, time, json; from crossmodal.registry.promotion import gate_lock\n"
        "with gate_lock(sys.argv[1], 60):\n"
        "    t0 = time.time(); time.sleep(1.0); t1 = time.time()\n"
        "print(json.dumps([t0, t1]))\n"
    )
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    procs = [subprocess.Popen([sys.executable, "-c", code, store], stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    spans = sorted(json.loads(p.communicate(timeout=120)[0]) for p in procs)
    assert all(p.returncode == 0 for p in procs)
    assert spans[0][1] <= spans[1][0], spans  # the second starts after the first has finished
    assert promotion.lock_path(store) == tmp_path / "mlflow.db.gate.lock"


# ----------------------------------------------------------------------------- real kills (slow)
@pytest.fixture
def worst_is_champion(tiny_run, tiny_test_rows, log_head, mlflow_store) -> str:
    """The worst head registered as version 1 (champion); returns the model name."""
    name = tiny_run["cfg"].mlflow.model_name
    worst, _ = _heads(tiny_run)
    promotion.register_and_gate(log_head(worst)[0], name, tiny_test_rows(), tiny_run["cfg"].promotion, mlflow_store)
    return name


@pytest.mark.slow
def test_process_killed_during_registration(worst_is_champion, mlflow_store, publish_job, publish_worker):
    name = worst_is_champion
    before = ({"1": "complete"}, {"champion": "1", "challenger": "1"})
    assert _state(name) == before

    # SIGKILL right after the new version is created: it is pending, no alias moved.
    proc = publish_worker(publish_job(mlflow_store, "killed-at-register"), "--kill-at", "register")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    versions, aliases = _state(name)
    assert versions == {"1": "complete", "2": "pending"} and aliases == before[1]
    run_id = MlflowClient().get_model_version(name, "2").tags["crossmodal.run_id"]

    # SIGKILL after the decision, before any alias moved.
    proc = publish_worker(publish_job(mlflow_store, "killed-at-aliases"), "--kill-at", "aliases")
    out = proc.communicate(timeout=600)[0]
    assert proc.returncode == -signal.SIGKILL, out[-2000:]
    versions, aliases = _state(name)
    # The second worker's gate recovered the first's debris before registering its own version.
    assert versions == {"1": "complete", "3": "decided"} and aliases == before[1]
    assert MlflowClient().get_run(run_id).info.status == "FAILED"

    promoted = MlflowClient().get_model_version(name, "3").tags[promotion.PROMOTED_TAG] == "True"
    with promotion.gate_lock(mlflow_store, 10):
        promotion.recover(name)
    # Recovery carries the recorded decision out, whichever it was.
    assert _state(name) == ({"1": "complete", "3": "complete"},
                            {"champion": "3" if promoted else "1", "challenger": "3"})


@pytest.mark.slow
def test_process_killed_during_training(tiny_run, worst_is_champion, mlflow_store, tmp_path):
    """Training writes files only: a run killed in the middle registers nothing and moves no alias."""
    cfg = tiny_run["cfg"]
    name = worst_is_champion
    before = _state(name)
    params = tmp_path / "params.yaml"
    dump = cfg.model_dump()
    dump["mlflow"]["tracking_uri"] = mlflow_store
    dump["train"].update(max_epochs=500, patience=500)  # long enough to be killed in the middle
    dump["paths"] = {"work": str(tmp_path / "work"), "cache": str(tmp_path / "cache"),
                     "reports": str(tmp_path / "reports"), "summary": str(tmp_path / "summary.json")}
    params.write_text(yaml.safe_dump(dump))
    flow = subprocess.Popen([sys.executable, "-m", "crossmodal.cli", "run", "--params", str(params),
                             "--manifest", str(tiny_run["manifest"])], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 600
    # Wait until training is under way (a first head is saved), then kill the run and everything it started.
    while time.time() < deadline and flow.poll() is None and not list((tmp_path / "work").rglob("head.json")):
        time.sleep(0.5)
    assert flow.poll() is None, flow.communicate()[0][-3000:]
    os.killpg(flow.pid, signal.SIGKILL)
    flow.communicate(timeout=60)
    assert _state(name) == before
    assert not (tmp_path / "summary.json").exists()
    assert not MlflowClient().search_runs([e.experiment_id for e in MlflowClient().search_experiments()],
                                          "tags.crossmodal.best_head != ''")  # no pipeline run was logged


# ----------------------------------------------------------------------------- an unreachable tracking server
@pytest.fixture
def mlflow_server(tmp_path, free_port, stop_process_group):
    port = free_port()
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--backend-store-uri",
                             f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
                             str(tmp_path / "server-artifacts"), "--host", "127.0.0.1", "--port", str(port),
                             "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                break
        except OSError:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError("mlflow server did not start") from None
            time.sleep(0.5)

    def stop():
        stop_process_group(proc, timeout=30)

    yield url, stop
    stop()


def test_tracking_server_stopped_mid_run(tiny_run, mlflow_server, tmp_path, monkeypatch, caplog):
    from typer.testing import CliRunner

    from crossmodal.cli import app

    url, stop = mlflow_server
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    dump = tiny_run["cfg"].model_dump()
    dump["mlflow"]["tracking_uri"] = url
    dump["paths"]["summary"] = str(tmp_path / "summary.json")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(dump))

    real = promotion.register_and_gate
    calls = []

    def stop_then_register(*args, **kwargs):
        calls.append(time.time())
        stop()  # the run has been logged; the server dies before the model is registered
        return real(*args, **kwargs)

    monkeypatch.setattr(promotion, "register_and_gate", stop_then_register)
    t0 = time.time()
    with caplog.at_level(logging.WARNING, logger="urllib3.connectionpool"):
        result = CliRunner().invoke(app, ["register", "--params", str(params), "--manifest", str(tiny_run["manifest"]),
                                          "--validated", str(tiny_run["validated_dir"]), "--models",
                                          str(tiny_run["models"]), "--reports", str(tiny_run["reports"])])
    mlflow.set_tracking_uri(None)
    output = result.output  # stdout and stderr as the terminal shows them
    assert calls, (result.exit_code, repr(result.exception), output)  # the run was logged before the server stopped
    print(output)
    assert result.exit_code == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert f"MLflow tracking server {url} is unreachable (connection refused) after 2 retries" in errors[0]
    assert "Traceback" not in output and "urllib3" not in output
    retried = [r for r in caplog.records if "Retrying" in r.getMessage()]
    assert len(retried) >= 2, [r.getMessage() for r in caplog.records]  # MLflow's HTTP retries did happen
    assert time.time() - t0 < 300
    assert not (tmp_path / "summary.json").exists()
