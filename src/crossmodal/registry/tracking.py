"""MLflow tracking: one parent run per pipeline run, one nested run per head, lineage, the registered model.

The stages before this one only write files; :func:`log_pipeline` reads them and records everything in MLflow,
so the Prefect flow and ``dvc repro`` log the same things. Run ids are passed explicitly (MLflow's active run is
thread-local and Prefect runs tasks in threads), and the client API is used wherever a run id is known.

Store: ``mlflow.tracking_uri`` in params, else ``$MLFLOW_TRACKING_URI``, else a SQLite database and an artifact
folder under ``mlflow/`` in the working directory. Browse it with::

    mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db --port 5000
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

from crossmodal.artifacts import (
    COMPARISON_FILE,
    DATA_DOCS_DIR,
    HEAD_FILE,
    METRICS_FILE,
    PER_CLASS_DIR,
    PLOTS_DIR,
    QUARANTINE_FILE,
    ROBUSTNESS_FILE,
    VALIDATION_FILE,
)
from crossmodal.config import Config, MlflowConfig
from crossmodal.errors import TrackingUnavailable

DEFAULT_STORE_DIR = "mlflow"
HEAD_TAG = "crossmodal.head"  # on each head's nested run
# On the parent run: the registered head, the manifest it read, the registered model it logs to.
BEST_HEAD_TAG, MANIFEST_TAG, MODEL_NAME_TAG = "crossmodal.best_head", "crossmodal.manifest", "crossmodal.model_name"
# The MLflow UI opens an experiment with this tag in its model-training view (runs, charts), not the GenAI one.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def resolve_tracking_uri(cfg: MlflowConfig) -> str:
    uri = cfg.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    store = Path(DEFAULT_STORE_DIR).resolve()
    store.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def _is_local_store(uri: str) -> bool:
    return uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri


def configure(cfg: MlflowConfig) -> str:
    """Point MLflow (tracking and registry) at the project's store and return its URI."""
    import mlflow

    uri = resolve_tracking_uri(cfg)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def ensure_store(cfg: MlflowConfig) -> str:
    """Point MLflow at the store and make sure it exists; returns its URI.

    The first client of a new SQLite store creates its tables, and MLflow's migrations do not expect a second
    process doing the same at the same moment: two runs started together would fail. One at a time here.
    """
    from mlflow.tracking import MlflowClient

    uri = configure(cfg)
    if uri.startswith("sqlite:///"):
        from filelock import FileLock

        from crossmodal.registry.promotion import lock_path

        with FileLock(str(lock_path(uri).with_suffix(".init.lock"))):
            MlflowClient().search_experiments(max_results=1)
    return uri


def ensure_experiment(cfg: MlflowConfig) -> str:
    """Return the experiment id, creating it with artifacts under ``cfg.artifact_root`` for a local store."""
    from mlflow.tracking import MlflowClient

    ensure_store(cfg)
    client = MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if _is_local_store(resolve_tracking_uri(cfg)):
        root = Path(cfg.artifact_root).resolve()
        root.mkdir(parents=True, exist_ok=True)
        location = root.as_uri()
    try:
        return client.create_experiment(cfg.experiment, artifact_location=location,
                                         tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except Exception:  # created by a concurrent run in between
        exp = client.get_experiment_by_name(cfg.experiment)
        if exp is None:
            raise
        return exp.experiment_id


# Query parameters that carry credentials in presigned or token URLs (S3, GCS, Azure SAS, generic ?token=).
_SECRET_QUERY = re.compile(r"(?i)([?&;](?:[\w.-]*(?:token|secret|password|passwd|pwd|key|signature|credential|sig|auth)"
                           r"[\w.-]*)=)[^&#;\s]*")
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/@\s]+@")
# Names of settings whose value is a secret whatever it looks like.
SECRET_KEY = re.compile(r"(?i)(token|secret|password|passwd|credential|auth|(?:^|[_-])key$|[a-z]key$)")


def redact_uri(uri: str) -> str:
    """Drop credentials from a URI before it is printed or logged.

    ``user:pass@host`` -> ``***@host``; ``?token=abc&X-Amz-Signature=...`` -> ``?token=***&X-Amz-Signature=***``.
    Works on a URI anywhere inside a longer string too.
    """
    if not isinstance(uri, str):
        return uri
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", uri))


def redact_params(params: dict[str, str]) -> dict[str, str]:
    """``params`` with secret-named keys masked and credentials removed from every value (see :func:`redact_uri`)."""
    return {k: "***" if SECRET_KEY.search(k.rsplit(".", 1)[-1]) and v not in ("", "None") else redact_uri(v)
            for k, v in params.items()}


def is_unreachable(err: BaseException) -> bool:
    """True when ``err`` (or what caused it) is a failure to reach an HTTP tracking server, not an answer from it."""
    try:
        from requests.exceptions import ConnectionError as RequestsConnectionError
        from requests.exceptions import Timeout as RequestsTimeout
        from urllib3.exceptions import MaxRetryError, NewConnectionError, ProtocolError

        network = (ConnectionError, RequestsConnectionError, RequestsTimeout, MaxRetryError, NewConnectionError,
                   ProtocolError)
    except ImportError:  # pragma: no cover - both come with MLflow
        network = (ConnectionError,)
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, network):
            return True
        # MLflow folds the urllib3 error into the text of an MlflowException ("API request to ... failed with
        # exception HTTPConnectionPool(...): Max retries exceeded ...").
        text = str(err).lower()
        if "max retries exceeded" in text or "failed to establish a new connection" in text:
            return True
        err = err.__cause__ or err.__context__
    return False


def unreachable_error(uri: str, err: BaseException) -> TrackingUnavailable:
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    text = str(err).lower()
    why = next((s for s in ("connection refused", "read timed out", "name or service not known",
                            "remote end closed connection", "connection reset") if s in text), "no answer")
    return TrackingUnavailable(
        f"MLflow tracking server {redact_uri(uri)} is unreachable ({why}) after "
        f"{MLFLOW_HTTP_REQUEST_MAX_RETRIES.get()} retries of each request (MLFLOW_HTTP_REQUEST_MAX_RETRIES, "
        f"timeout {MLFLOW_HTTP_REQUEST_TIMEOUT.get()} s: MLFLOW_HTTP_REQUEST_TIMEOUT); the model was not promoted. "
        "Start the server (or fix mlflow.tracking_uri / MLFLOW_TRACKING_URI) and run `crossmodal register` again; "
        "a half-registered version is removed by the next run's gate.")


def git_commit(cwd: str | Path = ".") -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


def dvc_hash(manifest_path: str | Path) -> str | None:
    """The DVC hash recorded for the folder (or file) holding the manifest, if DVC tracks it.

    Looks in ``dvc.lock`` (stage outputs) of the current directory and in the ``X.dvc`` file (``dvc add X``) of the
    manifest and of each folder above it.
    """
    import yaml

    manifest = Path(manifest_path).resolve()
    lock = Path("dvc.lock")
    if lock.exists():
        data = yaml.safe_load(lock.read_text()) or {}
        for stage in (data.get("stages") or {}).values():
            for out in stage.get("outs") or []:
                path = Path(out.get("path", "")).resolve()
                if "md5" in out and (manifest == path or path in manifest.parents):
                    return out["md5"]
    for tracked in [manifest, *manifest.parents]:
        dvcfile = tracked.parent / f"{tracked.name}.dvc"
        if tracked.name and dvcfile.is_file():
            data = yaml.safe_load(dvcfile.read_text()) or {}
            for out in data.get("outs") or []:
                if "md5" in out:
                    return out["md5"]
    return None


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = json.dumps(value) if isinstance(value, list | tuple) else str(value)


def config_params(cfg: Config) -> dict[str, str]:
    """Every knob as a flat MLflow param, except where the store lives; credentials in any value are redacted."""
    data = cfg.model_dump()
    data.pop("mlflow", None)
    data.pop("paths", None)
    flat: dict[str, str] = {}
    _flatten("", data, flat)
    return redact_params(flat)


def _log_metrics(client, run_id: str, metrics: dict[str, Any], prefix: str = "") -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [
        Metric(f"{prefix}{k}", float(v), now, 0)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and v == v
    ]
    if batch:
        client.log_batch(run_id, metrics=batch)


def live_head_run(client, experiment_id: str, parent_id: str, head: str) -> str | None:
    """The nested run ``crossmodal.registry.live`` opened for ``head`` while it trained, if any."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    runs = client.search_runs([experiment_id], max_results=1, filter_string=(
        f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_id}' and tags.`{HEAD_TAG}` = '{head}'"))
    return runs[0].info.run_id if runs else None


def log_head_run(client, experiment_id: str, parent_id: str, head: str, head_dir: Path, reports: Path,
                  metrics: dict[str, Any]) -> str:
    """A nested run per head: its settings, per-epoch curve, val/test metrics and plots.

    A head whose epochs were logged live (``crossmodal.registry.live``) keeps that run: only the epochs it did not
    log (none, unless the watcher missed a beat) are added.
    """
    from mlflow.entities import Metric, Param
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

    rid = live_head_run(client, experiment_id, parent_id, head)
    logged_steps: set[int] = set()
    if rid is None:
        rid = client.create_run(experiment_id, tags={MLFLOW_PARENT_RUN_ID: parent_id, MLFLOW_RUN_NAME: head,
                                                     HEAD_TAG: head}).info.run_id
    else:
        logged_steps = {m.step for m in client.get_metric_history(rid, "epoch_val_macro_f1")}
    info = json.loads((head_dir / HEAD_FILE).read_text())
    params = {"head": head, "best_epoch": info.get("best_epoch"), "epochs_run": info.get("epochs_run"),
              "family": info.get("family", "frozen")}
    for k, v in (info.get("init_args") or {}).items():
        params[f"init.{k}"] = v
    client.log_batch(rid, params=[Param(k, str(v)) for k, v in params.items()])
    now = int(time.time() * 1000)
    curve = [
        Metric(f"epoch_{k}", float(v), now, step)
        for step, row in ((int(row.get("epoch", i + 1)), row) for i, row in enumerate(info.get("history") or []))
        if step not in logged_steps
        for k, v in row.items()
        if k != "epoch" and isinstance(v, int | float) and not isinstance(v, bool) and v == v
    ]
    for i in range(0, len(curve), 900):  # MLflow caps a batch at 1000 metrics
        client.log_batch(rid, metrics=curve[i : i + 900])
    _log_metrics(client, rid, metrics.get("val") or {}, "val_")
    _log_metrics(client, rid, metrics.get("test") or {}, "test_")
    _log_metrics(client, rid, {k: metrics.get(k) for k in ("temperature", "ece_calibrated")})
    _log_metrics(client, rid, metrics.get("missing_text") or {}, "missing_text_")
    _log_metrics(client, rid, metrics.get("missing_image") or {}, "missing_image_")
    for plot in sorted((reports / PLOTS_DIR).glob(f"{head}_*.png")):
        client.log_artifact(rid, str(plot), PLOTS_DIR)
    per_class = reports / PER_CLASS_DIR / f"{head}.json"
    if per_class.exists():
        client.log_artifact(rid, str(per_class))
    client.log_artifact(rid, str(head_dir / HEAD_FILE))
    client.set_terminated(rid)
    return rid


def pipeline_tags(cfg: Config, manifest_path: str | Path) -> dict[str, str]:
    """A pipeline run's tags at its start: MLflow's context (user, source name and type), git, the manifest."""
    from mlflow.tracking.context.registry import resolve_tags

    tags = resolve_tags({MANIFEST_TAG: redact_uri(str(Path(manifest_path).resolve())),
                         MODEL_NAME_TAG: cfg.mlflow.model_name})
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    md5 = dvc_hash(manifest_path)
    if md5:
        tags["crossmodal.data_dvc_md5"] = md5
    return tags


def start_params(client, run_id: str, cfg: Config) -> None:
    """Every setting as a param of ``run_id`` (MLflow caps a batch at 100 params and a value at 6000 chars)."""
    from mlflow.entities import Param

    items = [Param(k, v[:6000]) for k, v in config_params(cfg).items()]
    for i in range(0, len(items), 90):
        client.log_batch(run_id, params=items[i : i + 90])


def log_pipeline(cfg: Config, manifest_path: str | Path, validated_dir: str | Path, train_dir: str | Path,
                 reports_dir: str | Path, metrics: dict[str, Any], validation: dict[str, Any], frame,
                 run_name: str | None = None, fingerprint: str | None = None,
                 run_id: str | None = None) -> dict[str, Any]:
    """Record a finished pipeline run in MLflow and log the registered head (``registered_head``) as a pyfunc model.

    ``metrics`` (reports_dir/metrics.json), ``validation`` (validated_dir/validation.json) and ``frame``
    (validated_dir/validated.parquet) are passed in already read: the caller needs them too. ``fingerprint`` (of
    the model to register, see ``crossmodal.registry.publish.model_fingerprint``) is recorded as tag
    ``crossmodal.fingerprint``.

    Returns ``{"tracking_uri", "experiment_id", "run_id", "model_uri", "best_head", "head_runs"}``; the parent
    run stays open (status RUNNING) until :func:`finish_run`, so the registry step can tag it. With ``run_id``
    (a run opened when the pipeline started, ``crossmodal.registry.live``) everything goes into that run;
    otherwise (``crossmodal register`` after ``dvc repro``) a new parent run is created.
    """
    from mlflow.tracking import MlflowClient

    import mlflow
    from crossmodal.serving.package import log_model

    validated_dir, train_dir, reports_dir = Path(validated_dir), Path(train_dir), Path(reports_dir)
    uri = configure(cfg.mlflow)
    experiment_id = ensure_experiment(cfg.mlflow)
    client = MlflowClient()
    best = metrics.get("registered_head") or metrics["best_head"]  # never a traditional baseline

    tags = {BEST_HEAD_TAG: best, "crossmodal.data_hash": str(validation.get("data_hash"))}
    if fingerprint:
        tags["crossmodal.fingerprint"] = fingerprint
    opened_here = run_id is None
    if opened_here:
        parent = client.create_run(experiment_id, run_name=run_name or f"pipeline-{best}",
                                   tags={**pipeline_tags(cfg, manifest_path), **tags})
        run_id = parent.info.run_id
    else:
        for key, value in tags.items():
            client.set_tag(run_id, key, value)
    try:
        if opened_here:
            start_params(client, run_id, cfg)
        counts = {k: validation.get(k) for k in ("rows_in", "rows_kept", "rows_quarantined")}
        _log_metrics(client, run_id, counts)
        best_metrics = metrics["heads"][best]
        _log_metrics(client, run_id, best_metrics.get("test") or {}, "test_")
        _log_metrics(client, run_id, best_metrics.get("val") or {}, "val_")
        _log_metrics(client, run_id, {k: metrics.get(k) for k in ("fusion_gain_macro_f1",
                                                                   "fusion_gain_over_linear_probe")})
        for versus, prefix in (("over_unimodal", "fusion_gain_macro_f1"),
                               ("over_linear_probe", "fusion_gain_over_linear_probe")):
            block = (metrics.get("fusion_gain_interval") or {}).get(versus) or {}
            _log_metrics(client, run_id, {f"{prefix}_ci_low": block.get("ci_low"),
                                          f"{prefix}_ci_high": block.get("ci_high")})
        for name in (QUARANTINE_FILE, VALIDATION_FILE):
            client.log_artifact(run_id, str(validated_dir / name), "data")
        if (validated_dir / DATA_DOCS_DIR).exists():
            client.log_artifacts(run_id, str(validated_dir / DATA_DOCS_DIR), "data/data_docs")
        client.log_artifact(run_id, str(reports_dir / METRICS_FILE))
        client.log_text(run_id, _comparison(metrics), COMPARISON_FILE)
        if (reports_dir / ROBUSTNESS_FILE).is_file():
            client.log_artifact(run_id, str(reports_dir / ROBUSTNESS_FILE))
        head_runs = {}
        for head, head_metrics in metrics["heads"].items():
            head_runs[head] = log_head_run(client, experiment_id, run_id, head, train_dir / head, reports_dir,
                                            head_metrics)
        with mlflow.start_run(run_id=run_id):
            with warnings.catch_warnings():  # MLflow registers two equal local sources and warns it picked one
                warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
                dataset = mlflow.data.from_pandas(frame.drop(columns=["_row"], errors="ignore"),
                                                  source=str(Path(manifest_path).resolve()),
                                                  name=Path(manifest_path).parent.name or "manifest",
                                                  targets="label")
            mlflow.log_input(dataset, context="training")
            info = log_model(train_dir, best, cfg, frame[frame["split"] == "test"],
                                   metrics["heads"][best].get("temperature") or 1.0)
        # Leaving start_run() marked the run FINISHED; it is not until registration and the gate are done.
        client.update_run(run_id, status="RUNNING")
        return {"tracking_uri": redact_uri(uri), "experiment_id": experiment_id, "run_id": run_id,
                "model_uri": info.model_uri, "best_head": best, "head_runs": head_runs}
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    from mlflow.tracking import MlflowClient

    MlflowClient().set_terminated(run_id, status=status)


def _comparison(metrics: dict[str, Any]) -> str:
    from crossmodal.evaluation.tables import comparison_table

    return comparison_table(metrics)
