"""The last stage: record the run in MLflow, register the best head, run the gate, write the summary.

``publish`` is what ``crossmodal register`` (the DVC stage) and the Prefect flow's last task call. The summary is
printed as one table and written as JSON for scripts and schedulers::

    {"heads": {HEAD: {"accuracy", "macro_f1", "roc_auc", "ece", "ece_calibrated", "temperature", "family",
     "modality", "missing_text", "missing_image"}}, "best_fusion", "best_unimodal", "best_head",
     "registered_head", "best_traditional",
     "fusion_gain_macro_f1", "rows": {"in", "kept", "quarantined", "quarantine_file"},
     "mlflow": {"tracking_uri", "experiment_id", "run_id", "model_name", "version", "champion_version"},
     "promotion": {"promoted", "reason", "metric", "challenger_score", "champion_score", "delta", ...}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crossmodal.atomic import write_json
from crossmodal.config import Config


def build_summary(metrics: dict[str, Any], validation: dict[str, Any], quarantine_file: str,
                  mlflow_info: dict[str, Any] | None = None, decision: dict[str, Any] | None = None) -> dict[str, Any]:
    heads = {}
    for head, m in metrics["heads"].items():
        test = m.get("test") or {}
        heads[head] = {k: test.get(k) for k in ("accuracy", "macro_f1", "roc_auc", "ece")}
        # missing_text / missing_image: the same metrics with one modality removed from every test row
        heads[head].update({k: m.get(k) for k in ("family", "modality", "ece_calibrated", "temperature",
                                                  "missing_text", "missing_image")})
    return {
        "heads": heads,
        "best_fusion": metrics.get("best_fusion"),
        "best_unimodal": metrics.get("best_unimodal"),
        "best_head": metrics.get("best_head"),
        "registered_head": metrics.get("registered_head", metrics.get("best_head")),
        "best_traditional": metrics.get("best_traditional"),
        "selection_metric": metrics.get("selection_metric", "macro_f1"),
        "fusion_gain_macro_f1": metrics.get("fusion_gain_macro_f1"),
        "rows": {"in": validation["rows_in"], "kept": validation["rows_kept"],
                 "quarantined": validation["rows_quarantined"], "quarantine_file": quarantine_file},
        "mlflow": mlflow_info or {},
        "promotion": decision or {},
    }


def publish(cfg: Config, manifest_path: str | Path, validated_dir: str | Path, train_dir: str | Path,
            reports_dir: str | Path, summary_path: str | Path | None = None,
            run_name: str | None = None) -> dict[str, Any]:
    import pandas as pd

    from crossmodal import promotion, tracking

    validated_dir, reports_dir = Path(validated_dir), Path(reports_dir)
    metrics = json.loads((reports_dir / "metrics.json").read_text())
    validation = json.loads((validated_dir / "validation.json").read_text())
    frame = pd.read_parquet(validated_dir / "validated.parquet")
    uri = tracking.resolve_tracking_uri(cfg.mlflow)
    remote = uri.startswith(("http://", "https://"))
    try:
        logged = tracking.log_pipeline(cfg, manifest_path, validated_dir, train_dir, reports_dir, metrics, validation,
                                       frame, run_name=run_name)
        run_id = logged["run_id"]
        try:
            name = cfg.mlflow.model_name
            version, decision = promotion.register_and_gate(logged["model_uri"], name,
                                                            frame[frame["split"] == "test"], cfg.promotion, uri,
                                                            run_id=run_id)
        except BaseException as err:
            if not (remote and tracking.is_unreachable(err)):  # marking the run FAILED needs the server too
                tracking.finish_run(run_id, "FAILED")
            raise
        tracking.finish_run(run_id)
        champion = promotion.current_champion(name)
    except Exception as err:
        # MLflow retried each request (MLFLOW_HTTP_REQUEST_MAX_RETRIES) before giving up: say so in one line
        # instead of a page of urllib3 traceback.
        if remote and tracking.is_unreachable(err):
            raise tracking.unreachable_error(uri, err) from None
        raise
    info = {"tracking_uri": logged["tracking_uri"], "experiment_id": logged["experiment_id"], "run_id": run_id,
            "model_name": name, "version": version, "champion_version": champion}
    summary = build_summary(metrics, validation, str((validated_dir / "quarantine.csv").resolve()), info,
                            decision.to_dict())
    if summary_path:
        write_json(summary_path, summary, default=str)
    return summary


def render(summary: dict[str, Any], metrics: dict[str, Any] | None = None) -> str:
    """The terminal report: the comparison table, the rows, where the run landed, who is champion."""
    from crossmodal.evaluate import comparison_table, robustness_table

    lines = []
    if metrics is not None:
        lines.append(comparison_table(metrics))
        lines.append("robustness (test macro-F1 with a modality removed):\n" + robustness_table(metrics))
    rows = summary["rows"]
    lines.append(f"rows: {rows['in']} in = {rows['kept']} kept + {rows['quarantined']} quarantined"
                 + (f" (see {rows['quarantine_file']})" if rows["quarantined"] else ""))
    ml = summary.get("mlflow") or {}
    if ml:
        lines.append(f"mlflow: run {ml['run_id']} in {ml['tracking_uri']} (experiment {ml['experiment_id']})")
        registered = summary.get("registered_head") or summary["best_head"]
        lines.append(f"model: {ml['model_name']} version {ml['version']} ({registered}) is challenger; "
                     f"champion is version {ml['champion_version']}")
    decision = summary.get("promotion") or {}
    if decision:
        lines.append(f"gate: {'PROMOTED' if decision['promoted'] else 'kept champion'}: {decision['reason']}")
    return "\n".join(lines)
