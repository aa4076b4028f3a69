"""The tuning flow: validate -> extract -> a hyperparameter search over the frozen-feature heads -> tuned.yaml.

    crossmodal tune --manifest data/demo/manifest.csv --trials 20          # or: python -m flows.tuning [params.yaml]
    crossmodal tune --heads concat,gated --timeout 600 --dask-address tcp://HOST:PORT

Validation and extraction are the training flow's own tasks (``flows.training``), so the features come from the
content-addressed feature store and a tune after a run (or a run after a tune) encodes nothing again. Each head has
an Optuna study in this process (TPE sampler seeded by ``train.seed`` and the head, MedianPruner); the flow asks it
for a trial, submits the trial as a Prefect task (``tune-<head>-<n>``) to the task runner that ``orchestration``
chooses (``flows.execution``: on a Dask cluster with ``--dask-address``), and tells the study its result. Up to
``slots`` trials run at once, one per worker; results are told in the order the trials were asked, so a search
with the same settings asks the same trials whatever finishes first. A task gets its settings and the finished
trials' curves as JSON and returns its value and whether it was pruned (``crossmodal.training.tuning``).

``trials`` counts every trial of the search, the heads taking turns: each head's first trial is its current
settings (the "before" figure), then each gets its second, and so on, so heads end with as many trials as can be
(20 trials over 7 heads: 3 or 2 each), and so does a search that ``timeout`` ends (seconds of search, after
extraction, past which no trial starts; those running finish). The search is one MLflow run in experiment
``<mlflow.experiment>-tune`` with a nested run per trial (``crossmodal.registry.trials``); the params file written
(``out_path``) is its artifact.
"""

from __future__ import annotations

import json
import sys
import time
from collections import deque
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from crossmodal.artifacts import STAGE_EVENTS, TUNE_EVENTS
from crossmodal.environment import set_env_defaults

set_env_defaults()  # Prefect reads its settings when it is imported: the offline, quiet defaults go first

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.runtime import flow_run  # noqa: E402

from crossmodal.config import load_config  # noqa: E402
from crossmodal.errors import TrainError  # noqa: E402
from crossmodal.files import atomic_path  # noqa: E402
from crossmodal.training.progress import event_writer  # noqa: E402
from flows.execution import Execution, ran  # noqa: E402
from flows.training import anchored, extract_stage, validate_task  # noqa: E402

# TPE's random start: half a head's trials, between 2 and 10 (Optuna's default), so a short search is still guided.
MAX_STARTUP_TRIALS = 10


@task(name="tune-trial", task_run_name="{name}")
def trial_task(name: str, job: dict, head: str, params: dict, completed: list[dict]) -> dict:
    """One trial: head ``head`` trained with ``params`` (``crossmodal.training.tuning.run_trial``)."""
    from crossmodal.training.tuning import run_trial

    t0 = time.perf_counter()
    return {**run_trial(job, head, params, completed), **ran(t0)}


def _study(train_cfg, head: str, trials: int):
    """Head ``head``'s study for ``trials`` trials, its first (its current settings) queued; returns (study, space,
    those settings)."""
    import optuna

    from crossmodal.training.tuning import sampler_seed, search_space, start_params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = search_space(train_cfg, head)
    actual, told = start_params(train_cfg, head, space)
    # constant_liar: trials asked while others of the head still run are steered away from those points.
    sampler = optuna.samplers.TPESampler(seed=sampler_seed(train_cfg, head), constant_liar=True,
                                         n_startup_trials=max(2, min(MAX_STARTUP_TRIALS, trials // 2)))
    study = optuna.create_study(study_name=head, direction="maximize", sampler=sampler)
    study.enqueue_trial(told)
    return study, space, actual


def _curves(study) -> list[dict[str, float]]:
    """The finished trials' validation macro-F1 by epoch, what a new trial is pruned against."""
    from optuna.trial import TrialState

    return [{str(k): v for k, v in t.intermediate_values.items()}
            for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def _tell(study, trial, result: dict) -> None:
    from optuna.trial import TrialState

    for row in result.get("history") or []:
        if "val_macro_f1" in row:
            trial.report(row["val_macro_f1"], row["epoch"])
    if result.get("failed"):
        study.tell(trial, state=TrialState.FAIL)
    elif result.get("pruned"):
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, result["value"])


def search(ex: Execution, job: dict, train_cfg, heads: list[str], trials: int, timeout: float | None = None,
           on_trial=None) -> dict[str, Any]:
    """Up to ``trials`` trials in all, the heads taking turns, on ``ex``'s task runner (see the module docstring); ``on_trial(result)``
    hears each finished trial, with its ``number``, ``seconds`` and ``worker``. Returns, per head, ``default`` (the
    current settings' validation macro-F1), ``best``, ``best_params``, ``best_trial``, ``trials``, ``pruned``,
    ``failed``, and the trials' results in order under ``"results"``."""
    per_head = -(-trials // len(heads))
    studies = {h: _study(train_cfg, h, per_head) for h in heads}
    # every head's k-th trial before any head's (k+1)-th
    queue = deque([h for _ in range(per_head) for h in heads][:trials])
    pending: deque = deque()
    ran_params: dict[tuple[str, int], dict] = {}
    results: list[dict] = []
    start = time.monotonic()
    while queue or pending:
        while queue and len(pending) < max(1, ex.describe()["slots"]):
            if timeout is not None and time.monotonic() - start >= timeout:
                queue.clear()
                break
            head = queue.popleft()
            study, space, actual = studies[head]
            trial = study.ask(space)
            params = actual if trial.number == 0 else dict(trial.params)
            ran_params[head, trial.number] = params
            name = f"tune-{head}-{trial.number}"
            future = ex.submit(trial_task, {"name": name, "job": job, "head": head, "params": params,
                                            "completed": _curves(study)}, training=True)
            pending.append((head, trial, future))
        if not pending:
            break
        head, trial, future = pending.popleft()
        result = future.result()  # a bug or lost worker ends the search; a head that cannot train is a result
        ex.record(f"tune-{head}-{trial.number}", result)
        _tell(studies[head][0], trial, result)
        result = {**result, "number": trial.number, "seconds": result.get("task_seconds")}
        results.append(result)
        if on_trial is not None:
            on_trial(result)
    return {"heads": {h: _outcome(h, studies[h][0], ran_params, results) for h in heads}, "results": results,
            "seconds": round(time.monotonic() - start, 3)}


def _outcome(head: str, study, ran_params: dict, results: list[dict]) -> dict[str, Any]:
    from optuna.trial import TrialState

    mine = [r for r in results if r["head"] == head]
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    out = {"trials": len(mine), "pruned": sum(bool(r["pruned"]) for r in mine),
           "failed": sum(bool(r["failed"]) for r in mine), "default": None, "best": None, "best_params": None,
           "best_trial": None}
    first = next((r for r in mine if r["number"] == 0), None)
    if first is not None:
        out["default"] = first["value"]
    if done:
        best = max(done, key=lambda t: (t.value, -t.number))  # ties: the earlier trial (the current settings first)
        out.update(best=best.value, best_trial=best.number, best_params=ran_params[head, best.number])
    elif mine and out["failed"] == len(mine):
        raise TrainError(f"tune: every trial of head {head} failed; the first: {mine[0]['failed']}")
    return out


def _run_dir(work: str) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return (Path(work) / "tune" / f"{stamp}-{(flow_run.get_id() or 'local')[:8]}").resolve()


def _header(result: dict, trials: int, timeout: float | None, params_path: str) -> list[str]:
    heads = result["heads"]
    total = sum(h["trials"] for h in heads.values())
    pruned = sum(h["pruned"] for h in heads.values())
    limit = f"at most {trials}" + (f" and {timeout:g} s" if timeout is not None else "")
    lines = [f"crossmodal tune, {result['finished']}: {total} trials ({limit}; {pruned} pruned) in "
             f"{result['search_seconds']:.0f} s, from {params_path}",
             f"study: MLflow experiment {result['mlflow']['experiment']}, run {result['mlflow']['run_id']}",
             "best validation macro-F1 per head, its settings before -> tuned (train.head_params below):"]
    for head, h in heads.items():
        def f1(v):
            return "-" if v is None else f"{v:.4f}"
        lines.append(f"  {head}: {f1(h['default'])} -> {f1(h['best'])} (trial {h['best_trial']})")
    lines += ["crossmodal run --params <this file> trains every head with its own settings", ""]
    return lines


@flow(name="crossmodal-tune", log_prints=True)
def tune_flow(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None,
              out_path: str = "tuned.yaml", trials: int = 20, timeout: float | None = None,
              heads: list[str] | None = None, progress_dir: str | None = None,
              dask_address: str | None = None) -> dict:
    """Validate, extract, search every head of ``heads`` (default: ``crossmodal.training.tuning.default_heads``),
    write ``out_path`` (the configuration read, with the best settings as ``train.head_params``) and return the
    search's summary: per head ``default``/``best`` validation macro-F1 and ``best_params``, ``out``, ``mlflow``,
    ``execution``. ``progress_dir``: each finished trial is appended to ``<progress_dir>/pipeline/tune.jsonl``."""
    from mlflow.tracking import MlflowClient

    from crossmodal.registry.live import LiveRun
    from crossmodal.registry.trials import log_study, log_trial, tune_experiment
    from crossmodal.training.tuning import check_heads, default_heads, tuned_params_text, tuning_job

    given = load_config(params_path, overrides)
    cfg = anchored(given)
    heads = check_heads(list(heads)) if heads else default_heads(cfg.train)
    if trials < 1:
        raise TrainError(f"--trials {trials}: a search needs at least one trial")
    run_dir = _run_dir(cfg.paths.work)
    manifest = str(Path(cfg.data.manifest).resolve())
    cache_dir = str(Path(cfg.paths.cache).resolve())
    stages = event_writer(progress_dir, STAGE_EVENTS)
    trial_events = event_writer(progress_dir, TUNE_EVENTS)
    tune_cfg = tune_experiment(cfg)
    with LiveRun(tune_cfg, manifest, f"tune-{Path(manifest).parent.name}-{run_dir.name}") as live:
        client = MlflowClient()

        def on_trial(result: dict) -> None:
            log_trial(client, live.experiment_id, live.run_id, result, result["number"], study=run_dir.name)
            if trial_events is not None:
                trial_events({k: result.get(k) for k in ("head", "number", "value", "pruned", "pruned_at", "failed",
                                                         "seconds", "worker")})

        with Execution(cfg.orchestration, dask_address, [str(Path(cfg.paths.work).resolve()), cache_dir],
                       [manifest]) as ex:
            cfg_dict = cfg.model_dump()
            if stages is not None:
                stages({"stage": "validate", "state": "started"})
            validated = ex.submit(validate_task, {"cfg": cfg_dict, "manifest": manifest,
                                                  "out_dir": str(run_dir / "validated"), "cache_dir": cache_dir}
                                  ).result()
            features, _ = extract_stage(ex, validated, cfg_dict, cache_dir, events=stages)
            job = tuning_job(validated["validated_path"], features["image_path"], features["text_path"], cfg.train)
            if stages is not None:
                stages({"stage": "tune", "state": "started"})
            found = search(ex, job, cfg.train, heads, trials, timeout, on_trial)
            execution = ex.describe()
        result = {"heads": found["heads"], "search_seconds": found["seconds"], "work_dir": str(run_dir),
                  "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "execution": execution,
                  "mlflow": {"run_id": live.run_id, "experiment": tune_cfg.mlflow.experiment,
                             "experiment_id": live.experiment_id}}
        best = {h: r["best_params"] for h, r in found["heads"].items() if r["best_params"]}
        text = tuned_params_text(given, best, _header(result, trials, timeout, params_path))
        out = Path(out_path).resolve()
        with atomic_path(out) as tmp:
            tmp.write_text(text)
        log_study(client, live.run_id, found["heads"], out)
    get_run_logger().info("tuned %s in %.1f s: %s", ", ".join(heads), found["seconds"], out)
    return {**result, "out": str(out), "trials": found["results"]}


def _heartbeats():
    """Flow-run heartbeats only when a Prefect server outlives this process (as ``flows.training.run_training``)."""
    from contextlib import nullcontext

    from prefect.settings import get_current_settings, temporary_settings

    if get_current_settings().api.url is not None:
        return nullcontext()
    return temporary_settings(updates={"flows.heartbeat_frequency": None})


def run_tune(params_path: str = "params.yaml", overrides: dict[str, Any] | None = None, out_path: str = "tuned.yaml",
             trials: int = 20, timeout: float | None = None, heads: list[str] | None = None,
             progress_dir: str | None = None, dask_address: str | None = None) -> dict:
    """``tune_flow`` as ``crossmodal tune`` runs it."""
    with _heartbeats():
        return tune_flow(params_path, overrides, out_path, trials, timeout, heads, progress_dir, dask_address)


if __name__ == "__main__":
    out = run_tune(*(sys.argv[1:2] or []))
    print(json.dumps({k: v for k, v in out.items() if k != "trials"}, indent=2, default=str))
