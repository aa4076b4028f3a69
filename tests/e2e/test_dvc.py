"""DVC: `dvc repro` runs the pipeline end to end in a real DVC repo; a second `dvc repro` has nothing to do."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml


def _run(args, cwd, env):
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, f"{args} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


@pytest.mark.slow  # two minutes here: `make test-all` runs it
def test_dvc_repro_end_to_end_then_nothing_to_do(tmp_path, tiny_config, repo_root):
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(repo_root / "dvc.yaml", repo / "dvc.yaml")
    cfg = tiny_config(tmp_path)
    cfg.paths.cache = str(repo / ".cache")
    (repo / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    dvc = [sys.executable, "-m", "dvc"]
    _run(["git", "init", "-q"], repo, env)
    _run(dvc + ["init", "-q"], repo, env)

    _run(dvc + ["repro"], repo, env)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"demo_data", "validate", "extract", "train", "evaluate", "register"}
    summary = json.loads((repo / "work" / "summary.json").read_text())
    assert summary["mlflow"]["champion_version"] == "1"
    assert summary["rows"]["in"] == summary["rows"]["kept"] + summary["rows"]["quarantined"]
    assert "crossmodal.data_dvc_md5" in _run_tags(cfg, summary["mlflow"]["run_id"])

    again = _run(dvc + ["repro"], repo, env)
    assert "Data and pipelines are up to date" in again


def _run_tags(cfg, run_id):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=cfg.mlflow.tracking_uri).get_run(run_id).data.tags
