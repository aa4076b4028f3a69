"""Two training runs finishing at once against one store: both finish, and the champion is decided by one gate at a
time (crossmodal.registry.promotion.gate_lock), so the second gate compares against the first gate's outcome.

Two real processes run the real ``publish`` (log the run, register, gate) on one temporary SQLite store; a barrier
file makes them enter the gate at the same moment. Without the lock both would see "no champion yet" and both
would promote.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from crossmodal.registry import promotion

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_runs_at_once_gate_one_at_a_time(tiny_run, mlflow_store, tmp_path):
    cfg = tiny_run["cfg"].model_dump()
    cfg["mlflow"].update(tracking_uri=mlflow_store, artifact_root=str(tmp_path / "artifacts"))
    assert not Path(mlflow_store.removeprefix("sqlite:///")).exists()  # a new store: both runs create it at once
    jobs = []
    for k in range(2):
        # Both racers publish the same model: forced, as otherwise the second would find the first's version under
        # the lock and register nothing (tests/test_registry.py checks that); here both must go through the gate.
        job = {"cfg": cfg, "manifest": str(tiny_run["manifest"]), "validated_dir": str(tiny_run["validated_dir"]),
               "models": str(tiny_run["models"]), "reports": str(tiny_run["reports"]), "run_name": f"racer-{k}",
               "force": True}
        path = tmp_path / f"racer{k}.json"
        path.write_text(json.dumps(job, default=str))
        jobs.append(path)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.publish_worker", "--job", str(job), "--barrier",
                               str(tmp_path / "barrier"), "--parties", "2"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for job in jobs]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outputs]  # both runs finish

    client = MlflowClient()
    summaries = [json.loads(job.with_suffix(".out.json").read_text()) for job in jobs]
    runs = [client.get_run(s["mlflow"]["run_id"]) for s in summaries]
    spans = sorted((float(r.data.tags["crossmodal.gate.started_at"]), float(r.data.tags["crossmodal.gate.finished_at"]),
                    s) for r, s in zip(runs, summaries))
    (_, first_end, first), (second_start, _, second) = spans
    assert first_end <= second_start, spans  # the gates did not overlap

    name = cfg["mlflow"]["model_name"]
    assert {s["mlflow"]["version"] for s in summaries} == {"1", "2"}
    assert first["promotion"]["promoted"] is True and first["promotion"]["reason"] == "no champion yet"
    # The second gate saw the first's champion and compared against it (same data, same model: no promotion).
    assert second["promotion"]["champion_version"] == first["mlflow"]["version"]
    assert second["promotion"]["promoted"] is False and "does not beat" in second["promotion"]["reason"]
    champion = client.get_model_version_by_alias(name, promotion.CHAMPION)
    assert str(champion.version) == first["mlflow"]["version"]
    history = client.get_registered_model(name).tags[promotion.HISTORY_TAG]
    assert history == first["mlflow"]["version"]  # exactly one champion move
    assert all(r.info.status == "FINISHED" for r in runs)
    versions = client.search_model_versions(f"name = '{name}'")
    assert {(v.tags or {}).get(promotion.STATE_TAG) for v in versions} == {"complete"}
