"""The training flow: validate -> extract -> train -> evaluate -> publish, as Prefect tasks.

    crossmodal run --manifest data/demo/manifest.csv          # or: python -m flows.training [params.yaml]
    crossmodal run --force                                    # recompute every stage, register again

Wiring only: every task calls a stage function from ``crossmodal`` and passes paths, ids and hashes, never frames
or models, so results stay small and a retry reads from disk. Unchanged stages are served from the stage cache
(``crossmodal.pipeline.stages``) and end in state ``Cached``; publishing registers nothing when the model is
identical to a registered version. The flow returns the run's summary with, under ``"stages"`` (also written to
``<run folder>/stages.json``), whether each stage was cached, its key and its seconds. Without
``PREFECT_API_URL`` the run starts a temporary Prefect API; scheduled runs: ``flows.schedule``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crossmodal.artifacts import EXTRACT_EVENTS, PROGRESS_DIR, STAGE_EVENTS, STAGES_FILE
from crossmodal.environment import set_env_defaults

set_env_defaults()  # Prefect reads its settings when it is imported: the offline, quiet defaults go first

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402
from prefect.states import Completed  # noqa: E402

from crossmodal.config import Config, from_dict, load_config  # noqa: E402
from crossmodal.errors import HideUserErrorTracebacks  # noqa: E402
from crossmodal.files import write_json  # noqa: E402
from crossmodal.training.progress import event_writer  # noqa: E402

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


def _done(result: dict, record: dict, what: str):
    """The task's return: a state named ``Cached`` when the stage was served from the stage cache."""
    out = {**result, "stage": record}
    return Completed(data=out, name="Cached", message=f"{what} from the stage cache") if record["cached"] else out


@task(name="validate")
def validate_task(cfg: dict, manifest: str, out_dir: str, cache_dir: str | None = None, force: bool = False):
    from crossmodal.pipeline import stages

    result, record = stages.cached_validate(manifest, from_dict(cfg), out_dir, cache_dir or cfg["paths"]["cache"],
                                            force)
    get_run_logger().info("rows: %s in = %s kept + %s quarantined%s", result["rows_in"], result["rows_kept"],
                          result["rows_quarantined"], " (cached)" if record["cached"] else "")
    return _done(result, record, "validated table")


def _extract_cache_key(context, parameters: dict[str, Any]) -> str:
    """Content-addressed: the data hash and the encoder settings (not the per-run folder of the table)."""
    enc = json.dumps(parameters["encoders"], sort_keys=True)
    raw = f"{parameters['data_hash']}|{enc}|{Path(parameters['cache_dir']).resolve()}"
    return "extract-" + hashlib.sha256(raw.encode()).hexdigest()


@task(name="extract", cache_key_fn=_extract_cache_key, persist_result=True, retries=1, retry_delay_seconds=2,
      retry_condition_fn=_transient)
def extract_task(validated_path: str, data_hash: str, encoders: dict, cache_dir: str, force: bool = False,
                 progress_dir: str | None = None, progress_bars: bool = True) -> dict:
    cfg = from_dict({"encoders": encoders})
    write = event_writer(progress_dir, EXTRACT_EVENTS)
    on_progress = None if write is None else (
        lambda kind, done, total: write({"kind": kind, "done": done, "total": total}))
    if force:
        from crossmodal.pipeline.stages import force_extract

        return force_extract(validated_path, cfg, cache_dir, progress_bars, on_progress)
    from crossmodal.features.extract import extract_features

    return extract_features(validated_path, cfg.encoders, cache_dir, progress=progress_bars,
                            on_progress=on_progress).to_dict()


@task(name="train")
def train_task(validated: dict, features: dict, cfg: dict, out_dir: str, cache_dir: str, force: bool = False,
               progress_dir: str | None = None):
    from crossmodal.pipeline import stages

    result, record = stages.cached_train(validated, features, from_dict(cfg), out_dir, cache_dir, force,
                                         progress_dir)
    return _done(result, record, "trained heads")


@task(name="evaluate")
def evaluate_task(trained: dict, out_dir: str, cache_dir: str, force: bool = False):
    from crossmodal.pipeline import stages

    result, record = stages.cached_evaluate(trained, out_dir, cache_dir, force)
    return _done(result, record, "reports")


@task(name="publish", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def publish_task(cfg: dict, manifest: str, validated_dir: str, train_dir: str, reports_dir: str,
                 summary_path: str, run_name: str, force: bool = False, run_id: str | None = None,
                 features: dict | None = None):
    from crossmodal.registry.publish import publish

    summary = publish(from_dict(cfg), manifest, validated_dir, train_dir, reports_dir, summary_path, run_name, force,
                      run_id, features)
    if summary.get("unchanged"):
        ml = summary["mlflow"]
        get_run_logger().info("unchanged since version %s of %s: nothing registered (champion: version %s)",
                              ml["version"], ml["model_name"], ml["champion_version"])
        return Completed(data=summary, name="Cached", message=f"unchanged since version {ml['version']}")
    return summary


def _stage(record: dict, seen: dict) -> dict:
    """A stage's record: cached or not, its key, seconds in the flow (task included) and in the stage itself."""
    return {**record, "stage_seconds": record["seconds"], "seconds": seen["seconds"]}


def _call(events, task_, *args, **kwargs) -> tuple[Any, dict]:
    """Run a task; returns (its result, {"cached", "seconds"} as seen from the flow, Prefect's overhead included).

    ``events`` hears that the stage started, or failed; :func:`_finished` says how it ended."""
    events({"stage": task_.name, "state": "started"})
    t0 = time.perf_counter()
    try:
        state = task_(*args, return_state=True, **kwargs)
        result = state.result()  # raises the task's error
    except BaseException as err:
        events({"stage": task_.name, "state": "failed", "seconds": round(time.perf_counter() - t0, 4),
                "error": type(err).__name__})
        raise
    return result, {"cached": state.name == "Cached", "seconds": round(time.perf_counter() - t0, 4)}


def _finished(events, stage: str, record: dict, **info) -> None:
    events({"stage": stage, "state": "cached" if record["cached"] else "finished", "seconds": record["seconds"],
            **info})


def _run_dir(cfg: Config) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_id = (flow_run.get_id() or "local")[:8]
    return Path(cfg.paths.work) / "runs" / f"{stamp}-{run_id}"


@flow(name="crossmodal-training", log_prints=True)
def training_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None,
                  summary_path: str | None = None, force: bool = False, progress_dir: str | None = None,
                  progress_bars: bool = True) -> dict:
    """Validate, extract, train every head, evaluate, publish to MLflow and run the promotion gate.

    Stages whose inputs are unchanged are served from the stage cache; ``force`` recomputes every stage and
    registers the model even when an identical one is registered. The MLflow run opens first and stays RUNNING
    while the stages run (``crossmodal.registry.live``); a failed stage marks it FAILED with the error.

    ``progress_dir`` (default ``<run folder>/progress``) receives the live progress as JSON lines: each head's
    epochs (``<head>.jsonl``), each stage's start and end and the extraction's counts (``pipeline/stages.jsonl``,
    ``pipeline/extract.jsonl``; ``crossmodal.training.progress``), for a display that watches it (``crossmodal
    run`` picks the folder before the flow starts). ``progress_bars``: extraction's tqdm bars on stderr.
    """
    from crossmodal.registry.live import LiveRun

    cfg = load_config(params_path, overrides)
    run_dir = _run_dir(cfg).resolve()
    manifest = str(Path(cfg.data.manifest).resolve())
    progress_dir = Path(progress_dir).resolve() if progress_dir else run_dir / PROGRESS_DIR
    with LiveRun(cfg, manifest, f"{Path(manifest).parent.name}-{run_dir.name}", progress_dir) as live:
        summary = _stages(cfg, run_dir, manifest, progress_dir, summary_path, force, live.run_id, progress_bars)
    return summary


def _stages(cfg: Config, run_dir: Path, manifest: str, progress_dir: Path, summary_path: str | None, force: bool,
            run_id: str, progress_bars: bool = True) -> dict:
    cfg_dict = cfg.model_dump()
    cache_dir = str(Path(cfg.paths.cache).resolve())
    stages: dict[str, dict] = {}
    events = event_writer(progress_dir, STAGE_EVENTS)

    validated, seen = _call(events, validate_task, cfg_dict, manifest, str(run_dir / "validated"), cache_dir, force)
    stages["validate"] = _stage(validated.pop("stage"), seen)
    _finished(events, "validate", stages["validate"], rows_in=validated["rows_in"], rows_kept=validated["rows_kept"],
              rows_quarantined=validated["rows_quarantined"])

    extract_args = (validated["validated_path"], validated["data_hash"], cfg_dict["encoders"], cache_dir)
    extract_opts = {"progress_dir": str(progress_dir), "progress_bars": progress_bars}
    extract = extract_task.with_options(refresh_cache=True) if force else extract_task
    features, seen = _call(events, extract, *extract_args, force=force, **extract_opts)
    if not all(Path(features[k]).exists() for k in ("image_path", "text_path")):
        # a cached Prefect result whose feature files were deleted since: recompute and refresh the record
        features, seen = _call(events, extract_task.with_options(refresh_cache=True), *extract_args, **extract_opts)
    # Cached: a Prefect cache hit, or a run that found every feature in the feature store.
    cached = seen["cached"] or not any(features.get("computed", {}).values())
    if seen["cached"] and "encoded" in features:  # the counts of the run that computed it: this one encoded nothing
        features = {**features, "encoded": dict.fromkeys(features["encoded"], 0),
                    "reused": {k: features["encoded"][k] + features["reused"][k] for k in features["reused"]}}
    stages["extract"] = {"cached": cached, "key": [features["image_key"], features["text_key"]],
                         "seconds": seen["seconds"]}
    _finished(events, "extract", stages["extract"], encoded=features.get("encoded"), reused=features.get("reused"))

    trained, seen = _call(events, train_task, validated, features, cfg_dict, str(run_dir / "models"), cache_dir,
                          force, str(progress_dir))
    stages["train"] = _stage(trained.pop("stage"), seen)
    _finished(events, "train", stages["train"])
    reports, seen = _call(events, evaluate_task, trained, str(run_dir / "reports"), cache_dir, force)
    stages["evaluate"] = _stage(reports.pop("stage"), seen)
    _finished(events, "evaluate", stages["evaluate"])
    summary, seen = _call(events, publish_task, cfg_dict, manifest, str(run_dir / "validated"), trained["train_dir"],
                          reports["reports_dir"], str(Path(summary_path or cfg.paths.summary).resolve()),
                          f"{Path(manifest).parent.name}-{run_dir.name}", force, run_id, features)
    ml = summary.get("mlflow") or {}
    stages["publish"] = {"cached": bool(summary.get("unchanged")), "key": ml.get("fingerprint"),
                         "seconds": seen["seconds"], "version": ml.get("version")}
    _finished(events, "publish", stages["publish"], version=ml.get("version"))
    summary["work_dir"] = str(run_dir)
    summary["stages"] = stages
    write_json(run_dir / STAGES_FILE, stages)
    get_run_logger().info("stages: %s", ", ".join(f"{k} {'cached' if v['cached'] else 'computed'} "
                                                  f"({v['seconds']:.2f} s)" for k, v in stages.items()))
    return summary


def run_training(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None,
                 summary_path: str | None = None, force: bool = False, heartbeats: bool | None = None,
                 progress_dir: str | None = None, progress_bars: bool = True) -> dict:
    """Run ``training_flow`` as ``crossmodal run`` does (``progress_dir``, ``progress_bars``: as there).

    ``heartbeats``: Prefect's flow-run heartbeats let a Prefect server mark a run whose process died as crashed.
    None (the default) keeps them only when the run reports to a server that outlives this process
    (``PREFECT_API_URL`` set): the temporary API of a run without one ends with the process, so there is nobody to
    tell, and stopping the heartbeat thread delays the end of every run (it sleeps in one-second steps).
    """
    from contextlib import nullcontext

    from prefect.settings import get_current_settings, temporary_settings

    if heartbeats is None:
        heartbeats = get_current_settings().api.url is not None
    quiet = nullcontext() if heartbeats else temporary_settings(updates={"flows.heartbeat_frequency": None})
    with quiet:
        return training_flow(params_path, overrides, summary_path, force, progress_dir, progress_bars)


if __name__ == "__main__":
    out = run_training(*(sys.argv[1:2] or []))
    print(json.dumps(out, indent=2, default=str))
