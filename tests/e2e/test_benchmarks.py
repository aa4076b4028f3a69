"""The benchmarks run (both ways: ``python -m benchmarks.NAME`` and ``python benchmarks/NAME.py``) and end with one
JSON line holding the figures they promise. Sizes here are tiny: this checks the benchmarks, not the speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]  # the repository


def run(args: list[str], timeout: int = 900) -> dict:
    env = {**os.environ, "PYTHONPATH": ""}  # the benchmarks must find their imports on their own
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
                         check=False)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert any("target" in line and ("PASS" in line or "FAIL" in line or "not measured" in line) for line in lines)
    return json.loads(lines[-1])


def test_train_benchmark():
    result = run(["-m", "benchmarks.train", "--quick", "--rows", "1500", "--heads", "concat,text_only"])
    assert set(result) == {"rows", "heads", "seconds", "rows_per_s", "epochs", "load_seconds", "seconds_over_load"}
    assert result["rows"] == 1500 and result["heads"] == 2 and result["seconds"] > 0
    assert set(result["epochs"]) == {"concat", "text_only"}


@pytest.mark.slow
def test_extract_benchmark():
    result = run(["benchmarks/extract.py", "--quick", "--n", "12", "--naive", "3", "--rss-n", "4"])
    assert set(result) == {"naive_img_per_s", "pipeline_img_per_s", "speedup", "naive_txt_per_s",
                           "pipeline_txt_per_s", "rss_ratio_4n_over_n", "cached_rerun_fraction"}
    assert all(v > 0 for v in result.values())
    assert result["cached_rerun_fraction"] < 1


@pytest.mark.slow
def test_predict_benchmark():
    result = run(["benchmarks/predict.py", "--quick", "--calls", "3", "--batch", "4"])
    assert set(result) == {"p50_ms", "p99_ms", "batch_pairs_per_s"}
    assert 0 < result["p50_ms"] <= result["p99_ms"] and result["batch_pairs_per_s"] > 0


@pytest.mark.slow
def test_flow_benchmark():
    result = run(["benchmarks/flow.py", "--quick", "--rows", "60"])
    assert set(result) >= {"cold_s", "cached_s", "cached_rerun_fraction", "stages"}
    assert set(result["stages"]) == {"validate", "extract", "train", "evaluate", "publish"}
    assert all(s["cached"] and not s["cold_cached"] for s in result["stages"].values())
    assert 0 < result["cached_s"] < result["cold_s"]
