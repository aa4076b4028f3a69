"""The experiment's recent pipeline runs, one record each, for ``crossmodal runs`` and scripts.

    from crossmodal.registry.runs import recent_runs
    for r in recent_runs(cfg.mlflow, limit=10):        # newest first
        print(r["started"], r["dataset"], r["best_head"], r["macro_f1"], r["version"], r["champion"], r["status"])

A pipeline run is a parent run of the experiment (``mlflow.experiment``): the heads' nested runs are left out.
Each record: ``run_id``, ``run_name``, ``started`` (ISO-8601 UTC), ``status`` (RUNNING, FINISHED, FAILED, KILLED),
``error`` (``crossmodal.error_type`` of a failed run), ``manifest`` (tag ``crossmodal.manifest``), ``dataset`` (the
name of its logged dataset input), ``best_head`` (tag ``crossmodal.best_head``), ``macro_f1`` (metric
``test_macro_f1``), ``model_name``, ``version`` (the version it registered, or for an unchanged model the version it
matched), ``unchanged``, ``promoted`` (the gate's verdict) and ``champion`` (whether the version it registered is the
champion now).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from crossmodal.config import MlflowConfig
from crossmodal.registry import tracking
from crossmodal.registry.learned_ids import RUN_ID_TAG
from crossmodal.registry.promotion import GATE_TAG, UNCHANGED_TAG, current_champion
from crossmodal.registry.tracking import BEST_HEAD_TAG, MANIFEST_TAG, MODEL_NAME_TAG

MACRO_F1_METRIC = "test_macro_f1"  # the registered head's test macro-F1, logged on the parent run


def _registered_by_run(client, model_name: str) -> dict[str, str]:
    """run id -> the latest version of ``model_name`` that run registered (by the version's run tag, else its
    source run); {} for a model not registered yet."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return {}
    out: dict[str, str] = {}
    for mv in sorted(versions, key=lambda m: int(m.version)):
        run_id = (mv.tags or {}).get(RUN_ID_TAG) or mv.run_id
        if run_id:
            out[run_id] = str(mv.version)
    return out


def _started(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat(timespec="seconds")


def _record(run, default_model: str, registered: dict[str, dict[str, str]], champions: dict[str, str | None],
            client) -> dict[str, Any]:
    tags, metrics = run.data.tags, run.data.metrics
    model_name = tags.get(MODEL_NAME_TAG) or default_model
    if model_name not in registered:
        registered[model_name] = _registered_by_run(client, model_name)
        champions[model_name] = current_champion(model_name)
    unchanged = tags.get(UNCHANGED_TAG)
    version = (unchanged or tags.get(f"{GATE_TAG}challenger_version")
               or registered[model_name].get(run.info.run_id))
    promoted = tags.get(f"{GATE_TAG}promoted")
    datasets = [d.dataset.name for d in (run.inputs.dataset_inputs if run.inputs else [])]
    return {
        "run_id": run.info.run_id,
        "run_name": run.info.run_name,
        "started": _started(run.info.start_time),
        "status": run.info.status,
        "error": tags.get("crossmodal.error_type"),
        "manifest": tags.get(MANIFEST_TAG),
        "dataset": datasets[0] if datasets else None,
        "best_head": tags.get(BEST_HEAD_TAG),
        "macro_f1": metrics.get(MACRO_F1_METRIC),
        "model_name": model_name,
        "version": version,
        "unchanged": unchanged is not None,
        "promoted": None if promoted is None or unchanged else promoted == "True",
        # The run that registered the champion, not the later runs that found the same model unchanged.
        "champion": version is not None and not unchanged and version == champions[model_name],
    }


def recent_runs(cfg: MlflowConfig, limit: int = 20) -> list[dict[str, Any]]:
    """The ``limit`` newest pipeline runs of ``cfg.experiment`` (see the module docstring); [] when the experiment
    does not exist yet. An unreachable tracking server is a TrackingUnavailable error of one line."""
    from mlflow.tracking import MlflowClient

    uri = tracking.configure(cfg)
    try:
        client = MlflowClient()
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            return []
        runs = client.search_runs([experiment.experiment_id], filter_string="tags.`mlflow.parentRunId` IS NULL",
                                  order_by=["attributes.start_time DESC"], max_results=limit)
        registered: dict[str, dict[str, str]] = {}
        champions: dict[str, str | None] = {}
        return [_record(run, cfg.model_name, registered, champions, client) for run in runs]
    except Exception as err:
        if uri.startswith(("http://", "https://")) and tracking.is_unreachable(err):
            raise tracking.unreachable_error(uri, err) from None
        raise
