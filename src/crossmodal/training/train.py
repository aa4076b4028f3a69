"""The train stage: every head in ``train.heads`` trained and written under one folder.

    from crossmodal.config import load_config
    from crossmodal.training.train import train_all
    cfg = load_config("params.yaml")
    result = train_all("work/validated/validated.parquet", "work/features/image.npy", "work/features/text.npy",
                       cfg.train, "work/models", cfg.encoders, cache_dir=cfg.paths.cache)    # a TrainResult

What lands under ``out_dir`` is listed in ``crossmodal.artifacts`` (``labels.json``, then per head ``head.json``,
``weights.safetensors`` and ``predictions.npz``; the traditional baselines write no weights); a head folder left
by an earlier run that this one does not train is removed. The stage is a set of independent tasks
(``crossmodal.training.tasks``): each head, stacking fold and baseline is one. ``train_all`` runs them with
``run_tasks``: by default one after another in this process; the Prefect flow passes one that submits each to its
task runner (threads, processes, a Dask cluster), and the files written are the same either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from crossmodal.config import FINETUNED_HEADS, TRADITIONAL_HEADS, EncodersConfig, TrainConfig
from crossmodal.training.tasks import plan_training, run_training_task

VIEWS_STORE = ".views"  # under out_dir: the feature store of augmented views when train_all is given no cache_dir


@dataclass
class TrainResult:
    """What train_all did; every per-head dict is keyed by head name."""

    out_dir: str
    labels: list[str]
    heads: list[str]
    rows: dict[str, int]  # per split
    head_dirs: dict[str, str] = field(default_factory=dict)
    val_macro_f1: dict[str, float] = field(default_factory=dict)
    best_epoch: dict[str, int] = field(default_factory=dict)
    epochs_run: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    processes: dict[str, int] = field(default_factory=dict)  # the fine-tuned head: train.finetune.processes
    tasks: list[dict] = field(default_factory=list)  # per task: name, worker, seconds (as run_tasks reports them)

    def to_dict(self) -> dict:
        return asdict(self)


def run_in_process(tasks: list[dict], job: dict) -> dict[str, dict]:
    """Run the tasks one after another here (they are in an order their ``after`` lists allow)."""
    import time

    out = {}
    for task in tasks:
        t0 = time.perf_counter()
        out[task["name"]] = {**run_training_task(task, job), "worker": "local",
                             "task_seconds": round(time.perf_counter() - t0, 3)}
    return out


def finish_training(job: dict, tasks: list[dict], results: dict[str, dict]) -> TrainResult:
    """The stage's TrainResult from every task's summary; removes stacking's parts."""
    import shutil
    from pathlib import Path

    from crossmodal.artifacts import TASK_PARTS_DIR

    shutil.rmtree(Path(job["out_dir"]) / TASK_PARTS_DIR, ignore_errors=True)
    result = TrainResult(out_dir=job["out_dir"], labels=job["labels"], heads=job["heads"], rows=job["rows"])
    by_head = {t["head"]: results[t["name"]] for t in tasks if t["kind"] not in ("fold", "base")}
    for name in job["heads"]:
        summary = by_head[name]
        seconds = summary["seconds"]
        if name == "stacking":  # its folds and the base models trained for it alone are part of its cost
            seconds += sum(results[t["name"]]["seconds"] for t in tasks if t["kind"] in ("fold", "base"))
        result.head_dirs[name] = summary["dir"]
        result.val_macro_f1[name] = summary["val_macro_f1"]
        result.best_epoch[name], result.epochs_run[name] = summary["best_epoch"], summary["epochs_run"]
        result.seconds[name] = round(seconds, 3)
        if "processes" in summary:
            result.processes[name] = summary["processes"]
    result.tasks = [{"name": t["name"], "worker": results[t["name"]].get("worker", "local"),
                     "seconds": results[t["name"]].get("task_seconds", results[t["name"]]["seconds"])} for t in tasks]
    return result


def train_all(validated_path, image_features_path, text_features_path, cfg: TrainConfig, out_dir,
              encoders: EncodersConfig | None = None, cache_dir=None, progress_dir=None,
              run_tasks: Callable[[list[dict], dict], dict[str, dict]] = run_in_process) -> TrainResult:
    """Train every head in ``cfg.heads`` and write their weights, metadata and predictions under ``out_dir``.

    The fine-tuned head (``finetune_xattn``, when ``train.finetune.enabled``) trains from the raw images and texts of
    ``validated_path`` with the encoders named in ``encoders`` (defaults when None); its checkpoints go under ``cache_dir`` (see
    ``crossmodal.training.finetune``). With ``progress_dir`` every head appends its epochs there while it trains
    (``crossmodal.training.progress``). ``run_tasks(tasks, job)`` returns ``{task name: its summary}``, each
    optionally with ``worker`` and ``task_seconds``; it must start a task only after those in its ``after`` list.
    """
    job, tasks = plan_training(validated_path, image_features_path, text_features_path, cfg, out_dir, encoders,
                               cache_dir, progress_dir)
    if cfg.augment.for_frozen and any(h not in FINETUNED_HEADS + TRADITIONAL_HEADS for h in job["heads"]):
        from crossmodal.features.extract import extract_views

        # The extract stage of the flow has encoded them already (this finds them); crossmodal train encodes them.
        store = cache_dir if cache_dir is not None else Path(job["out_dir"]) / VIEWS_STORE
        job["views"] = extract_views(validated_path, encoders or EncodersConfig(), cfg.augment, store).to_dict()
    return finish_training(job, tasks, run_tasks(tasks, job))
