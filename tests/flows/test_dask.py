"""Heads as tasks on Dask: a 2-worker LocalCluster trains every head, each on a worker, writing the same files as
a run in one process; a real `dask scheduler` and `dask worker` processes run `crossmodal run --dask-address`, and
a worker killed mid-training costs only its task."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from crossmodal.artifacts import HEAD_FILE, PREDICTIONS_FILE, WEIGHTS_FILE


def _same_heads(a: Path, b: Path, heads) -> None:
    """Every head's predictions (and weights, where it has them) are the same to the bit in ``a`` and ``b``."""
    for head in heads:
        pa, pb = np.load(a / head / PREDICTIONS_FILE), np.load(b / head / PREDICTIONS_FILE)
        assert sorted(pa.files) == sorted(pb.files), head
        for key in pa.files:
            np.testing.assert_array_equal(pa[key], pb[key], err_msg=f"{head}: {key}")
        if (a / head / WEIGHTS_FILE).is_file():
            assert (a / head / WEIGHTS_FILE).read_bytes() == (b / head / WEIGHTS_FILE).read_bytes(), head


def test_every_head_trains_on_a_local_cluster_worker_with_the_same_files(prefect_api, tiny_run, tmp_path):
    from crossmodal.features.extract import extract_features
    from flows.training import run_train

    cfg = tiny_run["cfg"]
    feats = extract_features(tiny_run["validated_dir"] / "validated.parquet", cfg.encoders, Path(cfg.paths.cache))
    params = tmp_path / "params.yaml"
    settings = cfg.model_dump()
    # Every head but the fine-tuned one (its encoders take a while to load in a fresh worker; the slow tests below
    # run it on a cluster), stacking's folds and a baseline included.
    settings["train"]["heads"] = [h for h in cfg.train.heads if h != "finetune_xattn"]
    params.write_text(yaml.safe_dump({**settings, "orchestration": {"task_runner": "dask", "workers": 2}}))
    result = run_train(str(tiny_run["validated_dir"] / "validated.parquet"), str(feats.image_path),
                       str(feats.text_path), str(tmp_path / "models"), str(params))

    workers = {t["worker"] for t in result["tasks"]}
    assert len(workers) == 2 and all(w.startswith("tcp://127.0.0.1:") for w in workers), result["tasks"]
    names = {t["name"] for t in result["tasks"]}
    assert {f"train-{h}" for h in result["heads"]} <= names
    assert any(n.startswith("fold-") for n in names)  # stacking's folds are tasks of their own
    _same_heads(tmp_path / "models", tiny_run["models"], result["heads"])
    assert not [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]  # no parts, no half-written


# ----------------------------------------------------------------------------- a real cluster (slow)
def _start(cmd: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture
def dask_cluster(tmp_path, free_port, stop_process_group):
    """A `dask scheduler` and two `dask worker --nthreads 1` processes on 127.0.0.1; yields the address."""
    from distributed import Client

    bin_dir = Path(sys.executable).parent
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    procs = [_start([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                     "--no-dashboard"], tmp_path / "scheduler.log")]
    try:
        for i in range(2):
            procs.append(_start([str(bin_dir / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                 "--no-dashboard", "--name", f"w{i}"], tmp_path / f"worker{i}.log"))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for proc in reversed(procs):
            stop_process_group(proc)


def _run(args: list[str], tmp_path: Path, env: dict, wait: bool = True) -> subprocess.Popen:
    cmd = [str(Path(sys.executable).parent / "crossmodal"), "run", "--plain", *args]
    log = tmp_path / f"run{len(list(tmp_path.glob('run*.log')))}.log"
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    if wait:
        proc.wait(timeout=900)
    return proc


def _params(tmp_path: Path, tiny_config, demo_dir: Path, name: str) -> Path:
    root = tmp_path / name
    cfg = tiny_config(root, orchestration={"task_runner": "auto"})
    cfg.data.manifest = str(demo_dir / "manifest.csv")
    params = tmp_path / f"{name}.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump()))
    return params


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "MLFLOW_TRACKING_URI"))}
    env.pop("CROSSMODAL_DASK_ADDRESS", None)
    return env


@pytest.mark.slow
def test_crossmodal_run_on_a_dask_cluster_matches_a_local_run(dask_cluster, tmp_path, tiny_config, demo_dir):
    from distributed import Client

    with Client(dask_cluster) as client:
        workers = sorted(client.scheduler_info(n_workers=-1)["workers"])
    remote = _params(tmp_path, tiny_config, demo_dir, "remote")
    proc = _run(["--params", str(remote), "--dask-address", dask_cluster], tmp_path, _env())
    assert proc.returncode == 0, (tmp_path / "run0.log").read_text()[-3000:]
    summary = json.loads((tmp_path / "remote" / "reports" / "summary.json").read_text())
    execution = summary["execution"]
    assert execution["task_runner"] == "dask" and execution["address"] == dask_cluster
    assert execution["workers"] == workers
    trained = [t for t in execution["tasks"] if t["name"].startswith("train-")]
    assert {t["name"] for t in trained} >= {f"train-{h}" for h in summary["heads"]}
    assert {t["worker"] for t in trained} <= set(workers)

    local = _params(tmp_path, tiny_config, demo_dir, "local")
    proc = _run(["--params", str(local), "--set", "orchestration.task_runner=threads"], tmp_path, _env())
    assert proc.returncode == 0, (tmp_path / "run1.log").read_text()[-3000:]
    here = json.loads((tmp_path / "local" / "reports" / "summary.json").read_text())
    assert here["execution"]["workers"] == ["local"]
    # The comparison table is the same: every head's test metrics, to the last digit.
    assert {h: m["macro_f1"] for h, m in summary["heads"].items()} == {h: m["macro_f1"] for h, m in here["heads"].items()}
    _same_heads(_models(tmp_path / "remote"), _models(tmp_path / "local"), list(summary["heads"]))


def _models(root: Path) -> Path:
    runs = sorted((root / "work" / "runs").iterdir())
    return runs[-1] / "models"


@pytest.mark.slow
def test_a_worker_killed_mid_training_costs_only_its_task(dask_cluster, tmp_path, tiny_config, demo_dir):
    from distributed import Client

    params = _params(tmp_path, tiny_config, demo_dir, "killed")
    proc = _run(["--params", str(params), "--dask-address", dask_cluster], tmp_path, _env(), wait=False)
    try:
        progress = tmp_path / "killed" / "work" / "progress"
        deadline = time.monotonic() + 600
        while not list(progress.glob("*/*.jsonl")):  # a head has reported an epoch: training is under way
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "run0.log").read_text()[-3000:]
            time.sleep(0.2)
        with Client(dask_cluster) as client:
            busy = {w: s for w, s in client.processing().items() if s}
            victim = sorted(busy)[0] if busy else sorted(client.scheduler_info(n_workers=-1)["workers"])[0]
            pid = client.run(os.getpid, workers=[victim])[victim]
        os.kill(pid, signal.SIGKILL)  # the nanny starts a fresh worker; the scheduler reruns what was lost
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, (tmp_path / "run0.log").read_text()[-3000:]
    summary = json.loads((tmp_path / "killed" / "reports" / "summary.json").read_text())
    models = _models(tmp_path / "killed")
    assert {f"train-{h}" for h in summary["heads"]} <= {t["name"] for t in summary["execution"]["tasks"]}
    for head in summary["heads"]:
        assert (models / head / HEAD_FILE).is_file() and (models / head / PREDICTIONS_FILE).is_file()
    assert not [p for p in models.iterdir() if p.name.startswith(".")]  # nothing half-written left behind


class _Blind:
    """Stands in for a Dask client with one worker on a machine without the shared folders: what the flow wrote is
    not where that worker looks."""

    def run(self, fn, probes):
        return {"tcp://10.0.0.7:40123": fn({f"{p}.elsewhere": size for p, size in probes.items()})}


def test_a_worker_that_cannot_see_the_run_folders_is_named(tmp_path):
    from crossmodal.errors import ClusterError
    from flows.execution import check_shared_storage

    cache, work = tmp_path / "cache", tmp_path / "work"
    with pytest.raises(ClusterError, match=r"Dask worker tcp://10\.0\.0\.7:40123 cannot see .*cache.* same path"):
        check_shared_storage(_Blind(), [cache, work])
    assert not list(cache.iterdir()) and not list(work.iterdir())  # the probe files are gone again

    class _Sees:
        def run(self, fn, probes):
            return {"tcp://10.0.0.7:40123": fn(probes), "tcp://10.0.0.8:40123": fn(probes)}

    check_shared_storage(_Sees(), [cache, work], [__file__])  # every worker sees them: no error


def test_the_flow_hands_workers_absolute_paths(tmp_path, monkeypatch):
    from crossmodal.config import from_dict
    from flows.training import anchored

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = anchored(from_dict({"data": {"data_root": "images"}, "mlflow": {"artifact_root": "mlflow/artifacts"}}))
    assert cfg.paths.cache == str(tmp_path / ".cache" / "crossmodal") and cfg.paths.work == str(tmp_path / "work")
    assert cfg.data.data_root == str(tmp_path / "images")
    assert cfg.mlflow.artifact_root == str(tmp_path / "mlflow" / "artifacts")
    assert cfg.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"  # the default store, here
    relative = anchored(from_dict({"mlflow": {"tracking_uri": "sqlite:///runs.db"}}))
    assert relative.mlflow.tracking_uri == f"sqlite:///{tmp_path / 'runs.db'}"
    served = anchored(from_dict({"mlflow": {"tracking_uri": "http://mlflow:5000"}}))
    assert served.mlflow.tracking_uri == "http://mlflow:5000"
