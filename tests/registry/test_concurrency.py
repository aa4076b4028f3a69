"""Two training runs finishing at once against one store: both finish, and the champion is decided by one gate at a
time (crossmodal.registry.promotion.gate_lock), so the second gate compares against the first gate's outcome.

Two real processes run the real ``publish`` (log the run, register, gate) on one temporary SQLite store; a barrier
file makes them enter the gate at the same moment. Without the lock both would see "no champion yet" and both
would promote.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from crossmodal.registry import promotion
from crossmodal.registry.history import read_history


@pytest.mark.slow
def test_two_runs_at_once_gate_one_at_a_time(tiny_run, mlflow_store, tmp_path, publish_job, publish_worker):
    assert not Path(mlflow_store.removeprefix("sqlite:///")).exists()  # a new store: both runs create it at once
    # Both racers publish the same model: forced, as otherwise the second would find the first's version under the
    # lock and register nothing (tests/registry/test_registry.py checks that); here both must go through the gate.
    jobs = [publish_job(mlflow_store, f"racer-{k}", force=True) for k in range(2)]
    procs = [publish_worker(job, "--barrier", str(tmp_path / "barrier"), "--parties", "2") for job in jobs]
    outputs = [p.communicate(timeout=900)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outputs]  # both runs finish

    client = MlflowClient()
    summaries = [json.loads(job.with_suffix(".out.json").read_text()) for job in jobs]
    runs = [client.get_run(s["mlflow"]["run_id"]) for s in summaries]
    spans = sorted((float(r.data.tags["crossmodal.gate.started_at"]), float(r.data.tags["crossmodal.gate.finished_at"]),
                    s) for r, s in zip(runs, summaries))
    (_, first_end, first), (second_start, _, second) = spans
    assert first_end <= second_start, spans  # the gates did not overlap

    name = tiny_run["cfg"].mlflow.model_name
    assert {s["mlflow"]["version"] for s in summaries} == {"1", "2"}
    assert first["promotion"]["promoted"] is True and first["promotion"]["reason"] == "no champion yet"
    # The second gate saw the first's champion and compared against it (same data, same model: no promotion).
    assert second["promotion"]["champion_version"] == first["mlflow"]["version"]
    assert second["promotion"]["promoted"] is False and "not promoted" in second["promotion"]["reason"]
    assert f"champion v{first['mlflow']['version']}" in second["promotion"]["reason"]
    champion = client.get_model_version_by_alias(name, promotion.CHAMPION)
    assert str(champion.version) == first["mlflow"]["version"]
    # exactly one champion move
    assert [e["version"] for e in read_history(name)] == [first["mlflow"]["version"]]
    assert all(r.info.status == "FINISHED" for r in runs)
    versions = client.search_model_versions(f"name = '{name}'")
    assert {(v.tags or {}).get(promotion.STATE_TAG) for v in versions} == {"complete"}
