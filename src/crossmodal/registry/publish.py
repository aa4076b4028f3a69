"""The last stage: record the run in MLflow, register the best fusion head, run the gate, write the summary.

    from crossmodal.registry.publish import publish, render
    summary = publish(cfg, "data/demo/manifest.csv", "work/validated", "work/models", "reports",
                      "reports/summary.json")
    print(render(summary))

``publish`` is what ``crossmodal register`` (the DVC stage) and the Prefect flow's last task call. The summary,
written as JSON for scripts and schedulers::

    {"heads": {HEAD: {"accuracy", "macro_f1", "roc_auc", "ece", "ece_calibrated", "temperature", "family",
     "modality", "missing_text", "missing_image"}}, "best_fusion", "best_unimodal", "best_head",
     "registered_head", "best_traditional", "selection_metric", "fusion_gain_macro_f1",
     "fusion_gain_over_linear_probe", "fusion_gain_interval" (``crossmodal.evaluation.evaluate``),
     "rows": {"in", "kept", "quarantined", "quarantine_file", "validated_file", "split_counts", "split_source"},
     "features": {"image": {"encoded", "reused"}, "text": {"encoded", "reused"}} (distinct items; null when the
                 extraction result is not passed in, as from ``crossmodal register``),
     "mlflow": {"tracking_uri", "experiment_id", "run_id", "model_name", "version", "champion_version",
                "fingerprint"},
     "promotion": {"promoted", "reason", "metric", "challenger_version", "challenger_score", "champion_version",
                   "champion_score", "delta", "unchanged", "test", "n_rows", "ci_low", "ci_high", "p_value",
                   "confidence"} (crossmodal.registry.promotion.GateDecision),
     "unchanged", "unchanged_since_version",
     "report": the path of <reports_dir>/report.html (``crossmodal.evaluation.report``; null when it could not be
               built), also logged to the MLflow run}

When the registry already holds a complete version with the same :func:`model_fingerprint`, nothing is logged,
registered or gated: ``unchanged`` is true and ``mlflow.version`` / ``unchanged_since_version`` name that version.
``force=True`` logs and registers anyway (``crossmodal run --force``). Once the gate has decided, the version, the
registered model and the run are described in words (``crossmodal.registry.descriptions``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from typing import Any

from crossmodal.artifacts import (
    HEAD_FILE,
    LABELS_FILE,
    METRICS_FILE,
    PREDICTIONS_FILE,
    QUARANTINE_FILE,
    REPORT_FILE,
    VALIDATED_FILE,
    VALIDATION_FILE,
)
from crossmodal.config import Config
from crossmodal.data.validated import read_validated
from crossmodal.files import write_json
from crossmodal.registry.descriptions import describe_registration, describe_run

log = logging.getLogger(__name__)
FINGERPRINT_VERSION = 1
# Libraries whose version is part of the logged model (its pip requirements) and can change its predictions.
_MODEL_LIBRARIES = ("mlflow", "torch", "timm", "transformers", "safetensors", "numpy")


def model_fingerprint(train_dir: str | Path, head: str, cfg: Config, temperature: float,
                      data_hash: str | None) -> str:
    """sha256 of everything the registered model is made of, and nothing a retrain changes by itself (timings).

    The head's files except its training-time outputs (``predictions.npz``) and, of ``head.json``, only what
    rebuilds the head (name, modality, family, init_args); the labels; what ``crossmodal.serving.package.log_model`` puts
    next to it (encoder settings, the image-pixel limit, the temperature, the allowed image root); the data it was
    trained and tested on (its hash: the run's lineage); the package's code (logged with the model) and the
    versions of the libraries it runs on.
    """
    from crossmodal.files import code_version

    train_dir = Path(train_dir)
    head_dir = train_dir / head
    meta = json.loads((head_dir / HEAD_FILE).read_text())
    versions = {}
    for lib in _MODEL_LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    root = cfg.serving.allowed_image_root
    header = {"v": FINGERPRINT_VERSION, "head": head, "labels": json.loads((train_dir / LABELS_FILE).read_text()),
              "definition": {k: meta.get(k) for k in ("name", "modality", "family", "init_args")},
              "encoders": cfg.encoders.model_dump(), "max_image_pixels": cfg.validation.max_image_pixels,
              "temperature": float(temperature), "allowed_image_root": str(Path(root).resolve()) if root else None,
              "data_hash": data_hash, "code": code_version(), "libraries": versions}
    h = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    for path in sorted(p for p in head_dir.rglob("*") if p.is_file()):
        rel = path.relative_to(head_dir).as_posix()
        if rel in (HEAD_FILE, PREDICTIONS_FILE):
            continue
        h.update(len(rel).to_bytes(8, "little") + rel.encode())
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def build_summary(metrics: dict[str, Any], validation: dict[str, Any], quarantine_file: str,
                  mlflow_info: dict[str, Any] | None = None, decision: dict[str, Any] | None = None,
                  validated_file: str | None = None, features: dict[str, Any] | None = None) -> dict[str, Any]:
    heads = {}
    for head, m in metrics["heads"].items():
        test = m.get("test") or {}
        heads[head] = {k: test.get(k) for k in ("accuracy", "macro_f1", "roc_auc", "ece")}
        # missing_text / missing_image: the same metrics with one modality removed from every test row
        heads[head].update({k: m.get(k) for k in ("family", "modality", "ece_calibrated", "temperature",
                                                  "missing_text", "missing_image")})
        heads[head]["calibration_accepted"] = (m.get("calibration") or {}).get("accepted")
        for key in ("variant", "members"):  # a traditional baseline's features; the ensemble's member weights
            if m.get(key) is not None:
                heads[head][key] = m[key]
        if "processes" in m:
            heads[head]["processes"] = m["processes"]
    return {
        "heads": heads,
        "best_fusion": metrics.get("best_fusion"),
        "best_unimodal": metrics.get("best_unimodal"),
        "best_head": metrics.get("best_head"),
        "registered_head": metrics.get("registered_head", metrics.get("best_head")),
        "best_traditional": metrics.get("best_traditional"),
        "selection_metric": metrics.get("selection_metric", "macro_f1"),
        "fusion_gain_macro_f1": metrics.get("fusion_gain_macro_f1"),
        "fusion_gain_over_linear_probe": metrics.get("fusion_gain_over_linear_probe"),
        "fusion_gain_interval": metrics.get("fusion_gain_interval"),
        "rows": {"in": validation["rows_in"], "kept": validation["rows_kept"],
                 "quarantined": validation["rows_quarantined"], "quarantine_file": quarantine_file,
                 "validated_file": validated_file, "split_counts": validation.get("split_counts"),
                 "split_source": validation.get("split_source")},
        "features": feature_counts(features),
        "mlflow": mlflow_info or {},
        "promotion": decision or {},
        "unchanged": bool((decision or {}).get("unchanged")),
        "unchanged_since_version": (decision or {}).get("challenger_version") if (decision or {}).get("unchanged")
        else None,
    }


def feature_counts(features: dict[str, Any] | None) -> dict[str, dict[str, int]] | None:
    """``{"image": {"encoded", "reused"}, "text": {...}}`` from an extraction result (None when not known here)."""
    if not features or "encoded" not in features:
        return None
    return {kind: {"encoded": int(features["encoded"][kind]), "reused": int(features["reused"][kind])}
            for kind in ("image", "text")}


REPORT_INPUTS_TAG = "crossmodal.report_inputs"  # where the run's files were: `crossmodal report --run-id` rebuilds


def attach_report(summary: dict[str, Any], validated_dir: str | Path, train_dir: str | Path,
                  reports_dir: str | Path, run_id: str | None, features: dict[str, Any] | None = None) -> None:
    """Build ``<reports_dir>/report.html``, set ``summary["report"]`` to its path and log it to ``run_id``.

    Never raises: a report that cannot be built or logged must not fail the run (``summary["report"]`` is None
    when it was not built)."""
    from crossmodal.evaluation.report import build_report

    try:
        path = build_report(validated_dir, train_dir, reports_dir, Path(reports_dir) / REPORT_FILE, summary,
                            features=features)
        summary["report"] = str(path.resolve())
    except Exception as err:
        log.warning("report.html not built: %s: %s", type(err).__name__, err)
        summary["report"] = None
        return
    if run_id:
        try:
            from mlflow.tracking import MlflowClient

            client = MlflowClient()
            dirs = {"validated": validated_dir, "models": train_dir, "reports": reports_dir}
            client.set_tag(run_id, REPORT_INPUTS_TAG, json.dumps({k: str(Path(v).resolve()) for k, v in dirs.items()}))
            client.log_artifact(run_id, str(path))
        except Exception as err:
            log.warning("report.html not logged to MLflow run %s: %s: %s", run_id, type(err).__name__, err)


def _unchanged(cfg: Config, fingerprint: str) -> tuple[dict[str, Any], Any] | None:
    """(mlflow info, decision) when the registry already holds this model as a complete version, else None."""
    from mlflow.tracking import MlflowClient

    from crossmodal.registry import promotion, tracking

    uri = tracking.ensure_store(cfg.mlflow)
    name = cfg.mlflow.model_name
    version = promotion.identical_version(name, fingerprint)
    if version is None:
        return None
    client = MlflowClient()
    mv = client.get_model_version(name, version)
    run_id = (mv.tags or {}).get("crossmodal.run_id") or mv.run_id
    try:
        experiment_id = client.get_run(run_id).info.experiment_id if run_id else None
    except Exception:  # the run was deleted; the version stands on its own
        experiment_id = None
    decision = promotion.unchanged_decision(name, version, cfg.promotion.metric)
    info = {"tracking_uri": tracking.redact_uri(uri), "experiment_id": experiment_id, "run_id": run_id,
            "model_name": name, "version": version, "champion_version": decision.champion_version,
            "fingerprint": fingerprint}
    return info, decision


def publish(cfg: Config, manifest_path: str | Path, validated_dir: str | Path, train_dir: str | Path,
            reports_dir: str | Path, summary_path: str | Path | None = None,
            run_name: str | None = None, force: bool = False, run_id: str | None = None,
            features: dict[str, Any] | None = None) -> dict[str, Any]:
    """Log the run, register the registered head and gate it; or nothing, if that model is registered already.

    ``force``: log and register even when an identical model is registered (see the module docstring).
    ``run_id``: the pipeline's MLflow run, opened when it started (``crossmodal.registry.live``); without it a run
    is created here. ``features``: the extraction result (``FeatureResult.to_dict()``), for the summary's
    ``features`` counts.
    """

    from mlflow.tracking import MlflowClient

    from crossmodal.registry import promotion, tracking

    validated_dir, reports_dir = Path(validated_dir), Path(reports_dir)
    validated_file = str((validated_dir / VALIDATED_FILE).resolve())
    metrics = json.loads((reports_dir / METRICS_FILE).read_text())
    validation = json.loads((validated_dir / VALIDATION_FILE).read_text())
    best = metrics.get("registered_head") or metrics["best_head"]
    fingerprint = model_fingerprint(train_dir, best, cfg, metrics["heads"][best].get("temperature") or 1.0,
                                    validation.get("data_hash"))
    uri = tracking.resolve_tracking_uri(cfg.mlflow)
    remote = uri.startswith(("http://", "https://"))
    name = cfg.mlflow.model_name
    try:
        found = None if force else _unchanged(cfg, fingerprint)
        if found is not None:
            info, decision = found
            log.info("unchanged since version %s of %s: nothing registered", info["version"], name)
            if run_id:  # the live run of this pipeline logged nothing new: say which version it matches
                MlflowClient().set_tag(run_id, promotion.UNCHANGED_TAG, info["version"])
                describe_run(run_id, metrics, info["version"], name, decision.to_dict())
                info = {**info, "run_id": run_id}
            summary = build_summary(metrics, validation, str((validated_dir / QUARANTINE_FILE).resolve()), info,
                                    decision.to_dict(), validated_file, features)
            attach_report(summary, validated_dir, train_dir, reports_dir, run_id, features)
            if summary_path:
                write_json(summary_path, summary, default=str)
            return summary
        frame = read_validated(validated_dir / VALIDATED_FILE)
        logged = tracking.log_pipeline(cfg, manifest_path, validated_dir, train_dir, reports_dir, metrics, validation,
                                       frame, run_name=run_name, fingerprint=fingerprint, run_id=run_id)
        run_id = logged["run_id"]
        try:
            from crossmodal.registry.drift_artifact import log_drift_reference
            from crossmodal.registry.learned_ids import learned_keys

            log_drift_reference(cfg, validated_dir, run_id, features, train_dir, best)  # before registering: each version has one
            version, decision = promotion.register_and_gate(logged["model_uri"], name,
                                                            frame[frame["split"] == "test"], cfg.promotion, uri,
                                                            run_id=run_id, fingerprint=fingerprint,
                                                            reuse_identical=not force,
                                                            learned_ids=learned_keys(frame))
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
    describe_registration(name, version, metrics, decision.to_dict(), cfg.encoders, run_id)  # decided: in words
    info = {"tracking_uri": logged["tracking_uri"], "experiment_id": logged["experiment_id"], "run_id": run_id,
            "model_name": name, "version": version, "champion_version": champion, "fingerprint": fingerprint}
    summary = build_summary(metrics, validation, str((validated_dir / QUARANTINE_FILE).resolve()), info,
                            decision.to_dict(), validated_file, features)
    attach_report(summary, validated_dir, train_dir, reports_dir, run_id, features)
    if summary_path:
        write_json(summary_path, summary, default=str)
    return summary


def render(summary: dict[str, Any], metrics: dict[str, Any] | None = None) -> str:
    """The terminal report: the comparison table, the rows, where the run landed, who is champion."""
    from crossmodal.evaluation.tables import comparison_table, robustness_table

    lines = []
    if metrics is not None:
        lines.append(comparison_table(metrics))
        lines.append("robustness (test macro-F1 with a modality removed):\n" + robustness_table(metrics))
    rows = summary["rows"]
    lines.append(f"rows: {rows['in']} in = {rows['kept']} kept + {rows['quarantined']} quarantined"
                 + (f" (see {rows['quarantine_file']})" if rows["quarantined"] else ""))
    ml = summary.get("mlflow") or {}
    registered = summary.get("registered_head") or summary["best_head"]
    if ml and summary.get("unchanged"):
        lines.append(f"model: unchanged since version {ml['version']} of {ml['model_name']} ({registered}, logged by "
                     f"run {ml['run_id']}): nothing registered; champion is version {ml['champion_version']}")
    elif ml:
        lines.append(f"mlflow: run {ml['run_id']} in {ml['tracking_uri']} (experiment {ml['experiment_id']})")
        lines.append(f"model: {ml['model_name']} version {ml['version']} ({registered}) is challenger; "
                     f"champion is version {ml['champion_version']}")
    decision = summary.get("promotion") or {}
    if decision and summary.get("unchanged"):
        lines.append("gate: not run (the model is unchanged; `crossmodal run --force` registers and gates it again)")
    elif decision:
        lines.append(f"gate: {'PROMOTED' if decision['promoted'] else 'kept champion'}: {decision['reason']}")
    return "\n".join(lines)
