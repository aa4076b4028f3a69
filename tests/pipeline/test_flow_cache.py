"""The training flow's stage cache, on the real flow: an unchanged run skips every stage and registers nothing; a
change reruns from the first stage it affects; --force reruns everything; an untrusted cache entry is recomputed.

One cold run per module (its own data, cache, MLflow store); each test then runs the flow again and reads the stage
records the flow returns, never timings. The tests do not depend on their order.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

STAGES = ("validate", "extract", "train", "evaluate", "publish")


def _cached(summary: dict) -> dict[str, bool]:
    return {name: rec["cached"] for name, rec in summary["stages"].items()}


@pytest.fixture(scope="module")
def cold(prefect_api, demo_dir, tmp_path_factory, tiny_config):
    from flows.training import training_flow

    root = tmp_path_factory.mktemp("flowcache")
    shutil.copytree(demo_dir, root / "data")  # a private copy: the tests touch its images
    # Two heads: what is cached does not depend on how many (tests/flows/test_flow.py runs all of them, fine-tuning
    # included, twice; test_cache.py checks that --force makes fine-tuning start from scratch).
    cfg = tiny_config(root, train={"heads": ["text_only", "concat"]})
    cfg.data.manifest = str(root / "data" / "manifest.csv")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(cfg.model_dump()))

    def run(overrides=None, force=False) -> dict:
        return training_flow(str(params), overrides, None, force)

    first = run()
    assert not any(_cached(first).values()), first["stages"]
    return {"run": run, "cfg": cfg, "root": root, "first": first}


def _registry(cfg) -> tuple[list[str], int, str | None]:
    client = MlflowClient(cfg.mlflow.tracking_uri)
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name = '{cfg.mlflow.model_name}'"))
    runs = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    champion = str(client.get_model_version_by_alias(cfg.mlflow.model_name, "champion").version)
    return versions, runs, champion


def test_unchanged_rerun_skips_every_stage_and_registers_nothing(cold):
    cfg = cold["cfg"]
    versions, runs, champion = _registry(cfg)
    out = cold["run"]()
    assert _cached(out) == dict.fromkeys(STAGES, True), out["stages"]
    # No new version, same champion; the run itself is on record (it opened when the flow started), saying so.
    assert _registry(cfg) == (versions, runs + 1, champion)
    run = MlflowClient(cfg.mlflow.tracking_uri).get_run(out["mlflow"]["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["crossmodal.unchanged_since_version"] == versions[-1]
    assert out["unchanged"] is True and out["mlflow"]["version"] == out["unchanged_since_version"] == versions[-1]
    assert out["mlflow"]["champion_version"] == champion and out["promotion"]["promoted"] is False
    rows = out["rows"]
    assert rows["in"] == rows["kept"] + rows["quarantined"] == cold["first"]["rows"]["in"]
    # The run folder shows everything, linked to the cache entries (one file on disk, not a copy).
    work = Path(out["work_dir"])
    assert work != Path(cold["first"]["work_dir"])
    for rel in ("validated/validated.parquet", "validated/quarantine.csv", "validated/validation.json",
                "models/labels.json", "models/concat/weights.safetensors", "models/text_only/head.json",
                "reports/metrics.json", "reports/robustness.md"):
        assert (work / rel).is_file(), rel
    assert (work / "models" / "concat" / "weights.safetensors").stat().st_nlink >= 2
    assert Path(rows["quarantine_file"]) == work / "validated" / "quarantine.csv"
    assert json.loads((work / "stages.json").read_text())["train"]["cached"] is True


def test_touching_one_image_revalidates_only(cold):
    import pandas as pd

    root = cold["root"]
    image = root / "data" / pd.read_csv(root / "data" / "manifest.csv")["image"].iloc[0]
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # same bytes, new mtime
    out = cold["run"]()
    # Validation ran again and found the same data: everything after it is still cached.
    assert _cached(out) == {**dict.fromkeys(STAGES, True), "validate": False}, out["stages"]
    per_run = ("quarantine_file", "validated_file")  # this run's folder
    assert out["rows"] == cold["first"]["rows"] | {k: out["rows"][k] for k in per_run}


def test_changed_train_setting_retrains_without_reextracting(cold):
    cache = Path(cold["cfg"].paths.cache)
    features = {p: p.stat().st_mtime_ns for p in cache.glob("*/*.npy")}
    assert features
    out = cold["run"]({"train.max_epochs": 7})
    cached = _cached(out)
    assert (cached["validate"], cached["extract"], cached["train"], cached["evaluate"]) == (True, True, False, False)
    assert {p: p.stat().st_mtime_ns for p in cache.glob("*/*.npy")} == features  # not one feature recomputed
    again = cold["run"]({"train.max_epochs": 7})  # and that setting's outputs are cached in turn
    assert all(_cached(again).values()), again["stages"]


def test_force_recomputes_every_stage(cold):
    cfg = cold["cfg"]
    versions, _, champion = _registry(cfg)
    features = {p: p.stat().st_mtime_ns for p in Path(cfg.paths.cache).glob("*/*.npy")}
    out = cold["run"](force=True)
    assert _cached(out) == dict.fromkeys(STAGES, False), out["stages"]
    assert all(p.stat().st_mtime_ns > t for p, t in features.items())  # features extracted again, swapped in
    new_versions, _, new_champion = _registry(cfg)
    assert new_versions == [*versions, str(int(versions[-1]) + 1)]  # registered again
    assert out["unchanged"] is False and out["mlflow"]["version"] == new_versions[-1]
    assert out["promotion"]["champion_version"] == champion  # the gate compared it with the champion
    assert new_champion == (out["mlflow"]["version"] if out["promotion"]["promoted"] else champion)
    assert all(_cached(cold["run"]()).values())  # the forced outputs now serve the next run


def test_untrusted_cache_entry_is_recomputed(cold):
    from crossmodal.artifacts import ENTRY_FILE

    out = cold["run"]()
    assert all(_cached(out).values())
    key = out["stages"]["evaluate"]["key"]
    entry = Path(cold["cfg"].paths.cache) / "stages" / "evaluate" / key
    (entry / ENTRY_FILE).unlink()  # as if the run that stored it had died before finishing the entry
    again = cold["run"]()
    assert _cached(again) == {**dict.fromkeys(STAGES, True), "evaluate": False}, again["stages"]
    assert (entry / ENTRY_FILE).is_file()  # stored again, complete
    metrics = entry / "out" / "metrics.json"
    with open(metrics, "r+b") as fh:  # a file of the entry truncated
        fh.truncate(10)
    third = cold["run"]()
    assert _cached(third)["evaluate"] is False and _cached(third)["train"] is True
    assert (Path(third["work_dir"]) / "reports" / "metrics.json").stat().st_size > 10
