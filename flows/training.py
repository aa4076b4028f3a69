"""The training flow: validate -> extract -> train -> evaluate -> publish, as Prefect tasks.

    crossmodal run --manifest data/demo/manifest.csv          # or: python -m flows.training [params.yaml]
    crossmodal run --force                                    # recompute every stage, register again

    crossmodal run --dask-address tcp://HOST:PORT             # every task on that Dask cluster

Wiring only: every task calls a stage function from ``crossmodal`` and passes paths, ids and hashes, never frames
or models, so results stay small, a retry reads from disk, and any worker can run any task. Extraction is one task
per shard of the items the feature store lacks, then one that assembles the arrays; training is one task per head,
stacking fold and baseline (named ``train-<head>``, ``fold-<head>-<k>``, ...); they run on the task runner that
``orchestration`` chooses (``flows.execution``), and the summary's ``execution`` says where each ran. Unchanged stages are served from the stage cache
(``crossmodal.pipeline.stages``) and end in state ``Cached``; publishing registers nothing when the model is
identical to a registered version. The flow returns the run's summary with, under ``"stages"`` (also written to
``<run folder>/stages.json``), whether each stage was cached, its key and its seconds. Without
``PREFECT_API_URL`` the run starts a temporary Prefect API; scheduled runs: ``flows.schedule``.
"""

from __future__ import annotations

import hashlib
import inspect
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
from crossmodal.errors import HideUserErrorTracebacks, TrainError, UserError  # noqa: E402
from crossmodal.files import write_json  # noqa: E402
from crossmodal.training.progress import event_writer  # noqa: E402
from flows.execution import Execution, ran  # noqa: E402

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


@task(name="validate", task_run_name="validate")
def validate_task(cfg: dict, manifest: str, out_dir: str, cache_dir: str | None = None, force: bool = False):
    from crossmodal.pipeline import stages

    t0 = time.perf_counter()
    result, record = stages.cached_validate(manifest, from_dict(cfg), out_dir, cache_dir or cfg["paths"]["cache"],
                                            force)
    get_run_logger().info("rows: %s in = %s kept + %s quarantined%s", result["rows_in"], result["rows_kept"],
                          result["rows_quarantined"], " (cached)" if record["cached"] else "")
    return _done({**result, **ran(t0)}, record, "validated table")


@task(name="plan-extract", task_run_name="plan-extract")
def plan_extract_task(validated_path: str, encoders: dict, store: str, shard_items: int) -> dict:
    from crossmodal.features.extract import plan_shards

    t0 = time.perf_counter()
    shards = plan_shards(validated_path, from_dict({"encoders": encoders}).encoders, store, shard_items)
    return {"shards": shards, **ran(t0)}


@task(name="extract-shard", task_run_name="{name}", retries=1, retry_delay_seconds=2, retry_condition_fn=_transient)
def extract_shard_task(name: str, validated_path: str, encoders: dict, store: str, shard: dict,
                       progress_dir: str | None = None) -> dict:
    """Encode one shard of one kind's distinct items into the store (see crossmodal.features.extract)."""
    from crossmodal.features.extract import encode_shard

    t0 = time.perf_counter()
    write = event_writer(progress_dir, EXTRACT_EVENTS)
    on_progress = None if write is None else (
        lambda kind, done, total: write({"kind": kind, "shard": name, "done": done, "total": total}))
    out = encode_shard(validated_path, from_dict({"encoders": encoders}).encoders, store, shard["kind"],
                       shard["start"], shard["stop"], on_progress=on_progress)
    return {**out, **ran(t0)}


def _extract_cache_key(context, parameters: dict[str, Any]) -> str:
    """Content-addressed: the data hash and the encoder settings (not the per-run folder of the table)."""
    enc = json.dumps(parameters["encoders"], sort_keys=True)
    raw = f"{parameters['data_hash']}|{enc}|{Path(parameters['cache_dir']).resolve()}"
    if parameters.get("augment"):  # the frozen heads' augmented views are part of the stage's output
        raw += f"|{json.dumps(parameters['augment'], sort_keys=True)}"
    return "extract-" + hashlib.sha256(raw.encode()).hexdigest()


@task(name="extract", task_run_name="extract", cache_key_fn=_extract_cache_key, persist_result=True, retries=1,
      retry_delay_seconds=2, retry_condition_fn=_transient)
def extract_task(validated_path: str, data_hash: str, encoders: dict, cache_dir: str, force: bool = False,
                 progress_dir: str | None = None, progress_bars: bool = True, private: str | None = None,
                 augment: dict | None = None) -> dict:
    """The assembled feature arrays, from the store the shards filled (what they left is encoded here); with
    ``augment`` (``train.augment`` when the frozen heads train on views) also the training rows' views."""
    from crossmodal.features.extract import extract_features, extract_views

    t0 = time.perf_counter()
    cfg = from_dict({"encoders": encoders, "train": {"augment": augment or {}}})
    write = event_writer(progress_dir, EXTRACT_EVENTS)
    on_progress = None if write is None else (
        lambda kind, done, total: write({"kind": kind, "done": done, "total": total}))
    if force:
        from crossmodal.pipeline.stages import force_extract

        out = force_extract(validated_path, cfg, cache_dir, progress_bars, on_progress, private)
    else:
        out = extract_features(validated_path, cfg.encoders, cache_dir, progress=progress_bars,
                               on_progress=on_progress).to_dict()
    if augment:
        out["views"] = extract_views(validated_path, cfg.encoders, cfg.train.augment, cache_dir).to_dict()
    return {**out, **ran(t0)}


@task(name="train", task_run_name="{name}", retries=1, retry_delay_seconds=2, retry_condition_fn=_transient)
def train_head_task(name: str, task: dict, job: dict) -> dict:
    """One training task: a head, a stacking fold or base model, a baseline (crossmodal.training.tasks)."""
    from crossmodal.training.tasks import run_training_task

    t0 = time.perf_counter()
    return {**run_training_task(task, job), **ran(t0)}


@task(name="evaluate", task_run_name="evaluate")
def evaluate_task(trained: dict, out_dir: str, cache_dir: str, force: bool = False):
    from crossmodal.pipeline import stages

    t0 = time.perf_counter()
    result, record = stages.cached_evaluate(trained, out_dir, cache_dir, force)
    return _done({**result, **ran(t0)}, record, "reports")


@task(name="publish", task_run_name="publish", retries=2, retry_delay_seconds=5, retry_condition_fn=_transient)
def publish_task(cfg: dict, manifest: str, validated_dir: str, train_dir: str, reports_dir: str,
                 summary_path: str, run_name: str, force: bool = False, run_id: str | None = None,
                 features: dict | None = None):
    from crossmodal.registry.publish import publish

    t0 = time.perf_counter()
    summary = publish(from_dict(cfg), manifest, validated_dir, train_dir, reports_dir, summary_path, run_name, force,
                      run_id, features)
    summary = {**summary, **ran(t0)}
    if summary.get("unchanged"):
        ml = summary["mlflow"]
        get_run_logger().info("unchanged since version %s of %s: nothing registered (champion: version %s)",
                              ml["version"], ml["model_name"], ml["champion_version"])
        return Completed(data=summary, name="Cached", message=f"unchanged since version {ml['version']}")
    return summary


def _stage(record: dict, seen: dict) -> dict:
    """A stage's record: cached or not, its key, seconds in the flow (task included) and in the stage itself."""
    return {**record, "stage_seconds": record["seconds"], "seconds": seen["seconds"]}


def _call(events, ex: Execution, task_, *args, **kwargs) -> tuple[Any, dict]:
    """Run a task on the run's task runner and wait for it; returns (its result, {"cached", "seconds"} as seen from
    the flow, Prefect's overhead included). ``events`` hears that the stage started, or failed; :func:`_finished`
    says how it ended."""
    events({"stage": task_.name, "state": "started"})
    t0 = time.perf_counter()
    try:
        future = ex.submit(task_, inspect.signature(task_.fn).bind(*args, **kwargs).arguments)
        result = future.result()  # raises the task's error
        state = future.state
    except BaseException as err:
        events({"stage": task_.name, "state": "failed", "seconds": round(time.perf_counter() - t0, 4),
                "error": type(err).__name__})
        raise
    if isinstance(result, dict) and "worker" in result:
        ex.record(task_.name, result)
        result = {k: v for k, v in result.items() if k not in ("worker", "task_seconds")}
    return result, {"cached": state.name == "Cached", "seconds": round(time.perf_counter() - t0, 4)}


def _finished(events, stage: str, record: dict, **info) -> None:
    events({"stage": stage, "state": "cached" if record["cached"] else "finished", "seconds": record["seconds"],
            **info})


def _task_error(name: str, err: BaseException) -> BaseException:
    """A failed task's error, naming the task (a head's task is named for it: ``train-concat``)."""
    if isinstance(err, UserError):
        try:
            return type(err)(f"{name}: {err}")
        except TypeError:  # an error type built from other arguments: its own message is clear enough
            return err
    return TrainError(f"task {name} failed: {type(err).__name__}: {err}")


def _run_training_tasks(ex: Execution):
    """``run_tasks`` for ``train_all``: each task a Prefect task run on the run's task runner, in plan order, each
    after those it waits for; the first failure in plan order is raised, naming its task."""
    def run(tasks: list[dict], job: dict) -> dict[str, dict]:
        futures = {}
        for t in tasks:
            after = [futures[name] for name in t.get("after", [])]
            futures[t["name"]] = ex.submit(train_head_task, {"name": t["name"], "task": t, "job": job},
                                           wait_for=after or None, gpu=t["kind"] == "finetune", training=True)
        results, failed = {}, None
        for name, future in futures.items():
            try:
                results[name] = future.result()
            except BaseException as err:  # noqa: BLE001 - every task is awaited; the first failure is raised
                failed = failed or (name, err)
        if failed:
            raise _task_error(*failed) from failed[1]
        for name, result in results.items():
            ex.record(name, result)
        return results

    return run


def anchored(cfg: Config) -> Config:
    """``cfg`` with every relative path and the default MLflow store made absolute, here: a task on a Dask worker
    started in another folder must read and write the same files (and the same tracking store) as this process."""
    from crossmodal.registry.tracking import resolve_tracking_uri

    cfg = cfg.model_copy(deep=True)
    for name in ("work", "cache", "reports", "summary"):
        setattr(cfg.paths, name, str(Path(getattr(cfg.paths, name)).resolve()))
    if cfg.data.data_root:
        cfg.data.data_root = str(Path(cfg.data.data_root).resolve())
    cfg.mlflow.artifact_root = str(Path(cfg.mlflow.artifact_root).resolve())
    uri = resolve_tracking_uri(cfg.mlflow)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):  # a relative file: its absolute path
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    cfg.mlflow.tracking_uri = uri
    return cfg


def _run_dir(cfg: Config) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    run_id = (flow_run.get_id() or "local")[:8]
    return Path(cfg.paths.work) / "runs" / f"{stamp}-{run_id}"


@flow(name="crossmodal-training", log_prints=True)
def training_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None,
                  summary_path: str | None = None, force: bool = False, progress_dir: str | None = None,
                  progress_bars: bool = True, dask_address: str | None = None) -> dict:
    """Validate, extract, train every head, evaluate, publish to MLflow and run the promotion gate.

    Stages whose inputs are unchanged are served from the stage cache; ``force`` recomputes every stage and
    registers the model even when an identical one is registered. The MLflow run opens first and stays RUNNING
    while the stages run (``crossmodal.registry.live``); a failed stage marks it FAILED with the error.

    ``progress_dir`` (default ``<run folder>/progress``) receives the live progress as JSON lines: each head's
    epochs (``<head>.jsonl``), each stage's start and end and the extraction's counts (``pipeline/stages.jsonl``,
    ``pipeline/extract.jsonl``; ``crossmodal.training.progress``), for a display that watches it (``crossmodal
    run`` picks the folder before the flow starts). ``progress_bars``: extraction's tqdm bars on stderr.
    ``dask_address``: run every task on the Dask cluster there (else ``$CROSSMODAL_DASK_ADDRESS``, else
    ``orchestration``; see ``flows.execution``).
    """
    from crossmodal.registry.live import LiveRun

    cfg = anchored(load_config(params_path, overrides))
    run_dir = _run_dir(cfg).resolve()
    manifest = str(Path(cfg.data.manifest).resolve())
    progress_dir = Path(progress_dir).resolve() if progress_dir else run_dir / PROGRESS_DIR
    with LiveRun(cfg, manifest, f"{Path(manifest).parent.name}-{run_dir.name}", progress_dir) as live:
        summary = _stages(cfg, run_dir, manifest, progress_dir, summary_path, force, live.run_id, progress_bars,
                          dask_address)
    return summary


def _stages(cfg: Config, run_dir: Path, manifest: str, progress_dir: Path, summary_path: str | None, force: bool,
            run_id: str, progress_bars: bool = True, dask_address: str | None = None) -> dict:
    cache_dir = str(Path(cfg.paths.cache).resolve())
    shared = [str(Path(cfg.paths.work).resolve()), cache_dir]
    with Execution(cfg.orchestration, dask_address, shared, [manifest]) as ex:
        summary, stages = _run_stages(ex, cfg, run_dir, manifest, progress_dir, summary_path, force, run_id,
                                      cache_dir, progress_bars)
    summary["work_dir"] = str(run_dir)
    summary["stages"] = stages
    write_json(run_dir / STAGES_FILE, stages)
    get_run_logger().info("stages: %s", ", ".join(f"{k} {'cached' if v['cached'] else 'computed'} "
                                                  f"({v['seconds']:.2f} s)" for k, v in stages.items()))
    return summary


def _run_stages(ex: Execution, cfg: Config, run_dir: Path, manifest: str, progress_dir: Path,
                summary_path: str | None, force: bool, run_id: str, cache_dir: str,
                progress_bars: bool) -> tuple[dict, dict]:
    cfg_dict = cfg.model_dump()
    stages: dict[str, dict] = {}
    events = event_writer(progress_dir, STAGE_EVENTS)

    validated, seen = _call(events, ex, validate_task, cfg_dict, manifest, str(run_dir / "validated"), cache_dir,
                            force)
    stages["validate"] = _stage(validated.pop("stage"), seen)
    _finished(events, "validate", stages["validate"], rows_in=validated["rows_in"], rows_kept=validated["rows_kept"],
              rows_quarantined=validated["rows_quarantined"])

    features, seen = extract_stage(ex, validated, cfg_dict, cache_dir, force, str(progress_dir), progress_bars,
                                   events)
    # Cached: a Prefect cache hit, or a run that found every feature in the feature store.
    views = features.get("views")  # train.augment with frozen: the training rows' augmented views
    views_encoded = sum(views["encoded"].values()) if views else 0
    cached = (seen["cached"] or not any(features.get("computed", {}).values())) and not views_encoded
    stages["extract"] = {"cached": cached, "key": [features["image_key"], features["text_key"]],
                         "seconds": seen["seconds"], "shards": seen["shards"]}
    _finished(events, "extract", stages["extract"], encoded=features.get("encoded"), reused=features.get("reused"),
              views={"views": views["views"], "rows": views["rows"], "encoded": views_encoded} if views else None)

    from crossmodal.pipeline import stages as cached_stages

    events({"stage": "train", "state": "started"})
    t0 = time.perf_counter()
    try:
        trained, record = cached_stages.cached_train(validated, features, cfg, str(run_dir / "models"), cache_dir,
                                                     force, str(progress_dir), _run_training_tasks(ex))
    except BaseException as err:
        events({"stage": "train", "state": "failed", "seconds": round(time.perf_counter() - t0, 4),
                "error": type(err).__name__})
        raise
    trained.pop("tasks", None)
    stages["train"] = _stage(record, {"seconds": round(time.perf_counter() - t0, 4)})
    _finished(events, "train", stages["train"])
    reports, seen = _call(events, ex, evaluate_task, trained, str(run_dir / "reports"), cache_dir, force)
    stages["evaluate"] = _stage(reports.pop("stage"), seen)
    _finished(events, "evaluate", stages["evaluate"])
    summary, seen = _call(events, ex, publish_task, cfg_dict, manifest, str(run_dir / "validated"),
                          trained["train_dir"], reports["reports_dir"],
                          str(Path(summary_path or cfg.paths.summary).resolve()),
                          f"{Path(manifest).parent.name}-{run_dir.name}", force, run_id, features)
    # Where every task ran, publishing included: added to the summary publishing wrote.
    summary["execution"] = ex.describe()
    write_json(Path(summary_path or cfg.paths.summary).resolve(), summary, default=str)
    ml = summary.get("mlflow") or {}
    stages["publish"] = {"cached": bool(summary.get("unchanged")), "key": ml.get("fingerprint"),
                         "seconds": seen["seconds"], "version": ml.get("version")}
    _finished(events, "publish", stages["publish"], version=ml.get("version"))
    return summary, stages


def extract_stage(ex: Execution, validated: dict, cfg_dict: dict, cache_dir: str, force: bool = False,
                  progress_dir: str | None = None, progress_bars: bool = False, events=None) -> tuple[dict, dict]:
    """The extract stage on ``ex``'s task runner: the items the store lacks, encoded by one task per shard
    (``orchestration.shard_items``) at once, then the arrays assembled by one more. ``validated``: the validate
    task's result (``validated_path``, ``data_hash``). Returns (``FeatureResult.to_dict()`` with this run's counts,
    {"cached", "seconds", "shards"}); ``events`` hears that the stage started, or failed."""
    from crossmodal.pipeline.stages import private_store

    if events is None:
        def events(_record):
            return None
    events({"stage": "extract", "state": "started"})
    t0 = time.perf_counter()
    store = str(private_store(cache_dir)) if force else cache_dir
    path, encoders = validated["validated_path"], cfg_dict["encoders"]
    encoded = {"image": 0, "text": 0}
    try:
        plan = ex.submit(plan_extract_task, {"validated_path": path, "encoders": encoders, "store": store,
                                             "shard_items": cfg_dict["orchestration"]["shard_items"]}).result()
        ex.record("plan-extract", plan)
        futures = {}
        for shard in plan["shards"]:
            name = f"extract-{shard['kind']}-{shard['start']}"
            futures[name] = ex.submit(extract_shard_task, {
                "name": name, "validated_path": path, "encoders": encoders, "store": store, "shard": shard,
                "progress_dir": progress_dir}, gpu=True)
        for name, future in futures.items():
            out = future.result()
            ex.record(name, out)
            encoded[out["kind"]] += out["encoded"]
    except BaseException as err:
        events({"stage": "extract", "state": "failed", "seconds": round(time.perf_counter() - t0, 4),
                "error": type(err).__name__})
        raise
    args = (path, validated["data_hash"], encoders, cache_dir)
    opts = {"progress_dir": progress_dir, "progress_bars": progress_bars, "private": store if force else None}
    augment = cfg_dict["train"]["augment"]
    if augment["views"] and augment["frozen"]:
        opts["augment"] = augment
    # A forced run writes a fresh private store: Prefect's cache of an earlier extraction must not answer for it.
    extract = extract_task.with_options(refresh_cache=True) if force or futures else extract_task
    features, seen = _call(lambda _: None, ex, extract, *args, force=force, **opts)
    if not all(Path(features[k]).exists() for k in ("image_path", "text_path")):
        # a cached Prefect result whose feature files were deleted since: recompute and refresh the record
        features, seen = _call(lambda _: None, ex, extract_task.with_options(refresh_cache=True), *args, **opts)
    if seen["cached"] and "encoded" in features:  # the counts of the run that computed it: this one encoded nothing
        features = {**features, "encoded": dict.fromkeys(features["encoded"], 0),
                    "reused": {k: features["encoded"][k] + features["reused"][k] for k in features["reused"]}}
    elif "encoded" in features:  # what the shards encoded is no longer "reused" by the assembling task
        features = {**features, "encoded": {k: features["encoded"][k] + encoded[k] for k in encoded},
                    "reused": {k: features["reused"][k] - encoded[k] for k in encoded}}
    return features, {**seen, "seconds": round(time.perf_counter() - t0, 4), "shards": len(futures)}


@flow(name="crossmodal-train", log_prints=True)
def train_flow(validated_path: str, image_path: str, text_path: str, out_dir: str, params_path: str = "params.yaml",
               overrides: dict[str, Any] | None = None, dask_address: str | None = None) -> dict:
    """The train stage alone (``crossmodal train``, the DVC stage): the same tasks as in ``training_flow``, on the
    task runner ``orchestration`` chooses, without the stage cache. Returns ``TrainResult.to_dict()``."""
    from crossmodal.training.train import train_all

    cfg = anchored(load_config(params_path, overrides))
    cache_dir = cfg.paths.cache
    shared = [str(Path(out_dir).resolve().parent), cache_dir]
    with Execution(cfg.orchestration, dask_address, shared, [validated_path, image_path, text_path]) as ex:
        result = train_all(validated_path, image_path, text_path, cfg.train, out_dir, cfg.encoders, cache_dir,
                           run_tasks=_run_training_tasks(ex))
    return result.to_dict()


def run_train(validated_path: str, image_path: str, text_path: str, out_dir: str, params_path: str = "params.yaml",
              overrides: dict[str, Any] | None = None, dask_address: str | None = None) -> dict:
    """``train_flow`` without flow-run heartbeats unless a Prefect server outlives this process (as
    :func:`run_training`)."""
    with _heartbeats(None):
        return train_flow(validated_path, image_path, text_path, out_dir, params_path, overrides, dask_address)


def _heartbeats(on: bool | None):
    from contextlib import nullcontext

    from prefect.settings import get_current_settings, temporary_settings

    if on is None:
        on = get_current_settings().api.url is not None
    return nullcontext() if on else temporary_settings(updates={"flows.heartbeat_frequency": None})


def run_training(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None,
                 summary_path: str | None = None, force: bool = False, heartbeats: bool | None = None,
                 progress_dir: str | None = None, progress_bars: bool = True, dask_address: str | None = None) -> dict:
    """Run ``training_flow`` as ``crossmodal run`` does (``progress_dir``, ``progress_bars``, ``dask_address``: as
    there).

    ``heartbeats``: Prefect's flow-run heartbeats let a Prefect server mark a run whose process died as crashed.
    None (the default) keeps them only when the run reports to a server that outlives this process
    (``PREFECT_API_URL`` set): the temporary API of a run without one ends with the process, so there is nobody to
    tell, and stopping the heartbeat thread delays the end of every run (it sleeps in one-second steps).
    """
    with _heartbeats(heartbeats):
        return training_flow(params_path, overrides, summary_path, force, progress_dir, progress_bars, dask_address)


if __name__ == "__main__":
    out = run_training(*(sys.argv[1:2] or []))
    print(json.dumps(out, indent=2, default=str))
