"""The pipeline's MLflow run while it runs: opened when the flow starts, live epochs, system metrics, the outcome.

    from crossmodal.registry.live import LiveRun
    with LiveRun(cfg, manifest, "demo-20261201T1200Z", progress_dir=run_dir / "progress") as live:
        ...                                   # the stages; live.run_id goes to publish(), which logs into it
    # left: FINISHED by publish, or FAILED with the error recorded when the block raised

While the block runs, the parent run is RUNNING in the MLflow UI with the usual context tags (user, source, git
commit), every setting as a param, and system metrics (CPU, memory, disk, network; GPU where present) sampled every
``SYSTEM_METRICS_SECONDS``. A thread tails the heads' progress files (``crossmodal.training.progress``) and logs
each epoch to that head's nested run as it happens, so curves grow in the UI during training; the nested run is
created at the head's first epoch and finished by ``crossmodal.registry.tracking.log_head_run`` at publish time.
An exception in the block marks the run FAILED with tags ``crossmodal.error`` and ``crossmodal.error_type``.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from crossmodal.config import Config
from crossmodal.registry.tracking import (
    HEAD_TAG,
    ensure_experiment,
    is_unreachable,
    pipeline_tags,
    resolve_tracking_uri,
    start_params,
    unreachable_error,
)
from crossmodal.training.progress import ProgressTail

log = logging.getLogger(__name__)
SYSTEM_METRICS_SECONDS = 5.0
POLL_SECONDS = 1.0


class LiveRun:
    """A context manager around a pipeline run; see the module docstring."""

    def __init__(self, cfg: Config, manifest: str | Path, run_name: str, progress_dir: str | Path | None = None,
                 system_metrics: bool = True):
        self.cfg, self.manifest, self.run_name = cfg, manifest, run_name
        self.progress_dir = Path(progress_dir) if progress_dir is not None else None
        self.system_metrics = system_metrics
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.head_runs: dict[str, str] = {}  # head -> nested run id, created at its first epoch
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._monitor = None
        self._tail = ProgressTail(self.progress_dir) if self.progress_dir is not None else None

    def __enter__(self) -> LiveRun:
        from mlflow.tracking import MlflowClient

        try:
            self.experiment_id = ensure_experiment(self.cfg.mlflow)
            client = MlflowClient()
            run = client.create_run(self.experiment_id, run_name=self.run_name,
                                    tags=pipeline_tags(self.cfg, self.manifest))
        except Exception as err:  # before any stage: say so in one line rather than after training
            uri = resolve_tracking_uri(self.cfg.mlflow)
            if uri.startswith(("http://", "https://")) and is_unreachable(err):
                raise unreachable_error(uri, err) from None
            raise
        self.run_id = run.info.run_id
        try:
            start_params(client, self.run_id, self.cfg)
        except BaseException:
            client.set_terminated(self.run_id, status="FAILED")
            raise
        if self.system_metrics:
            self._start_monitor()
        if self._tail is not None:
            self._thread = threading.Thread(target=self._watch, name="crossmodal-live-epochs", daemon=True)
            self._thread.start()
        return self

    def _start_monitor(self) -> None:
        try:  # psutil-based; a host where it cannot sample costs the metrics, not the run
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=SYSTEM_METRICS_SECONDS)
            self._monitor.start()
        except Exception as err:  # noqa: BLE001
            log.warning("system metrics are not recorded for this run: %s", err)
            self._monitor = None

    def _watch(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self.flush()

    def flush(self) -> None:
        """Log the epochs written since the last call (the watcher calls it every ``POLL_SECONDS``)."""
        if self._tail is None:
            return
        from mlflow.entities import Metric
        from mlflow.tracking import MlflowClient
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        try:
            lines = self._tail.poll()
            if not lines:
                return
            client = MlflowClient()
            batches: dict[str, list] = {}
            for head, record in lines:
                if head not in self.head_runs:
                    nested = client.create_run(self.experiment_id, tags={
                        MLFLOW_PARENT_RUN_ID: self.run_id, MLFLOW_RUN_NAME: head, HEAD_TAG: head})
                    self.head_runs[head] = nested.info.run_id
                stamp = int(float(record.get("time", 0)) * 1000)
                step = int(record.get("epoch", 0))
                batches.setdefault(head, []).extend(
                    Metric(f"epoch_{k}", float(v), stamp, step) for k, v in record.items()
                    if k not in ("epoch", "time") and isinstance(v, int | float) and not isinstance(v, bool))
            for head, metrics in batches.items():
                for i in range(0, len(metrics), 900):  # MLflow caps a batch at 1000 metrics
                    client.log_batch(self.head_runs[head], metrics=metrics[i : i + 900])
        except Exception as err:  # noqa: BLE001 - live curves are a view; the final logging is authoritative
            log.debug("live epoch logging skipped a beat: %s", err)

    def __exit__(self, exc_type, exc, tb) -> None:
        from mlflow.tracking import MlflowClient

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()
        if self._monitor is not None:
            try:
                self._monitor.finish()
            except Exception as err:  # noqa: BLE001
                log.debug("system metrics monitor: %s", err)
        client = MlflowClient()
        try:
            status = client.get_run(self.run_id).info.status
            if exc is not None:
                text = str(exc).strip() or type(exc).__name__
                client.set_tag(self.run_id, "crossmodal.error_type", type(exc).__name__)
                client.set_tag(self.run_id, "crossmodal.error", text[:5000])
                for rid in self.head_runs.values():
                    if client.get_run(rid).info.status == "RUNNING":
                        client.set_terminated(rid, status="FAILED")
                if status == "RUNNING":
                    client.set_terminated(self.run_id, status="FAILED")
            elif status == "RUNNING":  # publish had nothing to log (an unchanged model): the run still ends
                client.set_terminated(self.run_id, status="FINISHED")
        except Exception as err:  # noqa: BLE001 - never hide the block's own exception behind a store error
            if exc is None:
                raise
            log.warning("could not record the failure on MLflow run %s: %s", self.run_id, err)

    def info(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "experiment_id": self.experiment_id}
