"""The training flow: validate -> extract -> train -> evaluate -> publish, as Prefect tasks.

Wiring only: every task calls a stage function from ``crossmodal`` and passes paths, ids and hashes, never frames
or models, so results stay small, caching stays cheap and a retry reads from disk.

Run it:
    crossmodal run --manifest data/demo/manifest.csv          # same as: python -m flows.training
Without ``PREFECT_API_URL`` it starts a temporary Prefect API for the run; with it, the run shows in that server's
UI. ``crossmodal schedule --cron "0 3 * * *"`` serves it on a schedule (see flows/schedule.py).
"""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import logging
import crossmodal  # noqa: F401  (sets the offline, quiet environment defaults before Prefect loads)
from prefect import flow, get_run_logger, task
from prefect.runtime import flow_run

from crossmodal.config import Config, from_dict, load_config
from crossmodal.errors import HideUserErrorTracebacks

# Bad data or settings end in one clear log line, not a traceback from the engine's internals.
for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(HideUserErrorTracebacks())


def _transient(task, task_run, state) -> bool:
    """Retry only I/O failures (a tracking server or disk hiccup), never a bug or bad data."""
    try:
        state.result(raise_on_failure=True)
    except (OSError, ConnectionError, TimeoutError):
        return True
    except Exception as err:  # requests/urllib3 errors surface as MlflowException wrapping a connection error
        text = f"{type(err).__name__}: {err}".lower()
        return any(s in text for s in ("connection", "timed out", "temporarily unavailable", "503", "502"))
    return False


@task(name="validate")
def validate_task(cfg: dict, manifest: str, out_dir: str) -> dict:
    from crossmodal.validate import validate_manifest

    result = validate_manifest(manifest, from_dict(cfg), out_dir).to_dict()
    get_run_logger().info("rows: %s in = %s kept + %s quarantined", result["rows_in"], result["rows_kept"],
                          result["rows_quarantined"])
    return result


def _extract_cache_key(context, parameters: dict[str, Any]) -> str:
    """Content-addressed: the data hash and the encoder settings (not the per-run folder of the table)."""
    enc = json.dumps(parameters["encoders"], sort_keys=True)
    raw = f"{parameters['data_hash']}|{enc}|{Path(parameters['cache_dir']).resolve()}"
    return "extract-" + hashlib.sha256(raw.encode()).hexdigest()


@task(name="extract", cache_key_fn=_extract_cache_key, persist_result=True, retries=1, retry_delay_seconds=2,
      retry_condition_fn=_transient)
def extract_task(validated_path: str, data_hash: str, encoders: dict, cache_dir: str) -> dict:
    from crossmodal.extract import extract_features

    cfg = from_dict({"encoders": encoders}).encoders
    return extract_features(validated_path, cfg, cache_dir).to_dict()


@task(name="train")
def train_task(validated_path: str, image_path: str, text_path: str, train: dict, out_dir: str,
               encoders: dict | None = None, cache_dir: str | None = None) -> str:
    from crossmodal.train import train_all

    cfg = from_dict({"train": train, "encoders": encoders or {}})
    train_all(validated_path, image_path, text_path, cfg.train, out_dir, cfg.encoders, cache_dir)
    return out_dir


@task(name="evaluate")
def evaluate_task(train_dir: str, out_dir: str) -> str:
    from crossmodal.evaluate import evaluate_all

    evaluate_all(train_dir, out_dir)
    return str(Path(out_dir) / "metrics.json")


@task(name="publish", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def publish_task(cfg: dict, manifest: str, validated_dir: str, train_dir: str, reports_dir: str,
                 summary_path: str, run_name: str) -> dict:
    from crossmodal.publish import publish

    return publish(from_dict(cfg), manifest, validated_dir, train_dir, reports_dir, summary_path, run_name)


def _run_dir(cfg: Config) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_id = (flow_run.get_id() or "local")[:8]
    return Path(cfg.paths.work) / "runs" / f"{stamp}-{run_id}"


@flow(name="crossmodal-training", log_prints=True)
def training_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None,
                  summary_path: str | None = None) -> dict:
    """Validate, extract, train every head, evaluate, publish to MLflow and run the promotion gate."""
    cfg = load_config(params_path, overrides)
    cfg_dict = cfg.model_dump()
    run_dir = _run_dir(cfg).resolve()
    manifest = str(Path(cfg.data.manifest).resolve())
    validated = validate_task(cfg_dict, manifest, str(run_dir / "validated"))
    extract_args = (validated["validated_path"], validated["data_hash"], cfg_dict["encoders"],
                    str(Path(cfg.paths.cache).resolve()))
    features = extract_task(*extract_args)
    if not all(Path(features[k]).exists() for k in ("image_path", "text_path")):
        # a cached Prefect result whose feature files were deleted since: recompute and refresh the record
        features = extract_task.with_options(refresh_cache=True)(*extract_args)
    train_dir = train_task(validated["validated_path"], features["image_path"], features["text_path"],
                           cfg_dict["train"], str(run_dir / "models"), cfg_dict["encoders"],
                           str(Path(cfg.paths.cache).resolve()))
    reports = str(run_dir / "reports")
    evaluate_task(train_dir, reports)
    summary = publish_task(cfg_dict, manifest, str(run_dir / "validated"), train_dir, reports,
                           str(Path(summary_path or cfg.paths.summary).resolve()),
                           f"{Path(manifest).parent.name}-{run_dir.name}")
    summary["work_dir"] = str(run_dir)
    return summary


if __name__ == "__main__":
    out = training_flow(*(sys.argv[1:2] or []))
    print(json.dumps(out, indent=2, default=str))
