"""A hyperparameter search in MLflow: one parent run per search, one nested run per trial, the outcome on the parent.

    from crossmodal.registry.trials import log_study, log_trial, tune_experiment
    cfg_tune = tune_experiment(cfg)                    # experiment "<mlflow.experiment>-tune", so `crossmodal runs`
    with LiveRun(cfg_tune, manifest, name) as live:    # lists pipeline runs only; the parent as for a pipeline run
        log_trial(client, live.experiment_id, live.run_id, trial_result, number=3)
        log_study(client, live.run_id, summary, "tuned.yaml")

A trial's run (``<head>-<number>``, nested under the parent) holds the trial's settings as params, each epoch's
``epoch_val_macro_f1``, ``epoch_val_loss`` and ``epoch_train_loss`` (steps are epochs), ``val_macro_f1`` when it ran
to the end, and its outcome as tag ``crossmodal.trial_state``: ``complete``, ``pruned`` (with ``pruned_at_epoch``)
or ``failed``. The parent gets the best settings per head (params ``best.<head>.<key>``), each head's validation
macro-F1 with its settings before the search and at its best (``default_val_macro_f1.<head>``,
``best_val_macro_f1.<head>``), and the tuned params file as an artifact.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from crossmodal.config import Config
from crossmodal.registry.tracking import HEAD_TAG

TUNE_SUFFIX = "-tune"
TRIAL_TAG, TRIAL_STATE_TAG, STUDY_TAG = "crossmodal.trial", "crossmodal.trial_state", "crossmodal.study"


def tune_experiment(cfg: Config) -> Config:
    """``cfg`` with its MLflow experiment ``<mlflow.experiment>-tune``: searches are kept apart from pipeline runs."""
    out = cfg.model_copy(deep=True)
    out.mlflow.experiment = cfg.mlflow.experiment + TUNE_SUFFIX
    return out


def trial_state(result: dict[str, Any]) -> str:
    return "failed" if result.get("failed") else "pruned" if result.get("pruned") else "complete"


def log_trial(client, experiment_id: str, parent_id: str, result: dict[str, Any], number: int,
              study: str | None = None) -> str:
    """One finished trial (``crossmodal.training.tuning.run_trial``'s result, plus ``seconds`` and ``worker`` when
    known) as a nested run of ``parent_id``; returns its run id."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    head, state = result["head"], trial_state(result)
    tags = {MLFLOW_PARENT_RUN_ID: parent_id, MLFLOW_RUN_NAME: f"{head}-{number}", HEAD_TAG: head,
            TRIAL_TAG: str(number), TRIAL_STATE_TAG: state}
    if study:
        tags[STUDY_TAG] = study
    rid = client.create_run(experiment_id, tags=tags).info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(f"epoch_{k}", float(v), now, int(row["epoch"]))
               for row in result.get("history") or [] for k, v in row.items() if k != "epoch"]
    if result.get("value") is not None:
        metrics.append(Metric("val_macro_f1", float(result["value"]), now, 0))
    if result.get("pruned_at") is not None:
        metrics.append(Metric("pruned_at_epoch", float(result["pruned_at"]), now, 0))
    if result.get("seconds") is not None:
        metrics.append(Metric("trial_seconds", float(result["seconds"]), now, 0))
    params = [Param(k, str(v)) for k, v in sorted(result["params"].items())]
    extra = [RunTag("crossmodal.worker", str(result["worker"]))] if result.get("worker") else []
    if result.get("failed"):
        extra.append(RunTag("crossmodal.error", str(result["failed"])[:5000]))
    client.log_batch(rid, params=params, tags=extra)
    for i in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 metrics
        client.log_batch(rid, metrics=metrics[i : i + 900])
    client.set_terminated(rid, status="FAILED" if state == "failed" else "FINISHED")
    return rid


def log_study(client, parent_id: str, heads: dict[str, dict[str, Any]], tuned_path: str | Path) -> None:
    """The search's outcome on its parent run: ``heads`` maps each head to ``{"default", "best", "best_params",
    "trials", "pruned"}``; ``tuned_path``, the params file written, becomes an artifact."""
    from mlflow.entities import Metric, Param

    now = int(time.time() * 1000)
    params, metrics = [], []
    for head, h in heads.items():
        params += [Param(f"best.{head}.{k}", str(v)) for k, v in sorted((h.get("best_params") or {}).items())]
        for key in ("default", "best"):
            if h.get(key) is not None:
                metrics.append(Metric(f"{key}_val_macro_f1.{head}", float(h[key]), now, 0))
        metrics += [Metric(f"{key}.{head}", float(h.get(key, 0)), now, 0) for key in ("trials", "pruned")]
    for i in range(0, len(params), 90):  # MLflow caps a batch at 100 params
        client.log_batch(parent_id, params=params[i : i + 90])
    for i in range(0, len(metrics), 900):
        client.log_batch(parent_id, metrics=metrics[i : i + 900])
    client.log_artifact(parent_id, str(tuned_path))
