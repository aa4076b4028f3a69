"""The train stage as independent tasks: every head, stacking fold, base model and baseline is one task.

    from crossmodal.training.tasks import plan_training, run_training_task
    job, tasks = plan_training("work/validated/validated.parquet", "work/features/image.npy", "work/features/text.npy",
                               cfg.train, "work/models", cfg.encoders)
    results = {t["name"]: run_training_task(t, job) for t in tasks}  # any process, in any order the "after" lists allow
    # crossmodal.training.train.finish_training(job, tasks, results): the stage's TrainResult

A task is a small JSON-able dict, and so is ``job`` (the run's paths and settings): tasks pass paths, ids and settings,
never arrays or modules, so any process that sees the same files (a Dask worker on another machine, a retry after a
crash) can run any task. Kinds:

    {"name": "train-concat", "kind": "head", "head": "concat"}            a frozen-feature head -> <out>/concat/
    {"name": "fold-text_only-2", "kind": "fold", "head": "text_only", "fold": 2}
                                                                          stacking: out-of-fold probabilities
    {"name": "base-image_only", "kind": "base", "head": "image_only"}     stacking's base model, when not a head
    {"name": "train-stacking", "kind": "stacking", "head": "stacking", "after": [...]}   the meta-classifier
    {"name": "train-finetune_xattn", "kind": "finetune", ...}             from raw inputs (crossmodal.training.finetune)
    {"name": "train-cnn_rnn", "kind": "cnn_rnn", ...}                     word pieces + image features (training.cnn_rnn)
    {"name": "train-traditional_text", "kind": "traditional", ...}        a baseline (crossmodal.training.traditional)

Every task seeds itself, so what it writes is the same, to the bit, whichever process or machine runs it and in
whatever order. Its output folder is written aside and moved into place whole (``crossmodal.files.atomic_dir``), so
a task killed midway leaves nothing half-written; stacking's parts go to ``<out>/.parts/`` and are removed when the
stage finishes. Torch's random generator is one per process, so the tasks that draw from it hold a lock: threads
of one process train one head at a time (results would otherwise depend on the interleaving), and the
cores are used by processes (``orchestration.task_runner``).
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from crossmodal.artifacts import HEAD_FILE, LABELS_FILE, PREDICTIONS_FILE, TASK_PARTS_DIR, WEIGHTS_FILE
from crossmodal.config import (
    ENSEMBLE_HEADS,
    FINETUNED_HEADS,
    HEAD_NAMES,
    RNN_HEADS,
    TRADITIONAL_HEADS,
    EncodersConfig,
    TrainConfig,
)
from crossmodal.data.split import SPLITS
from crossmodal.errors import TrainError
from crossmodal.files import atomic_dir, atomic_path
from crossmodal.heads.files import save_head
from crossmodal.heads.inference import predict_gates, predict_proba, without
from crossmodal.heads.stacking import UNIMODAL
from crossmodal.training.dataset import SplitFeatures, load_split_features
from crossmodal.training.loop import EPOCH_ROWS, TRAIN_THREADS, BatchStream, best_epoch, torch_threads, train_head
from crossmodal.training.progress import epoch_writer
from crossmodal.training.stacking import fold_assignment, folds_to_predict, train_stacking

# Tasks that draw from torch's per-process random generator (see the module docstring).
_TORCH = threading.Lock()
_DATA: dict = {}  # this process's copy of the run's features: one entry, keyed by the files and their mtimes


def plan_training(validated_path, image_path, text_path, cfg: TrainConfig, out_dir,
                  encoders: EncodersConfig | None = None, cache_dir=None, progress_dir=None) -> tuple[dict, list]:
    """The run's ``job`` and its tasks, costliest first (the order to submit them in); writes ``labels.json``.

    ``encoders``: what the fine-tuned head loads (defaults when None); ``cache_dir``: where fine-tuning keeps its checkpoints (``crossmodal.training.finetune``); ``progress_dir``: where
    each head appends its epochs while it trains (``crossmodal.training.progress``).

    A head folder left in ``out_dir`` by an earlier run that this one does not train is removed (it would otherwise
    be evaluated as if current); so are stacking parts a killed run left behind.
    """
    tcfg = cfg
    data, labels = load_split_features(validated_path, image_path, text_path)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LABELS_FILE).write_text(json.dumps(labels, indent=2))
    heads = [h for h in tcfg.heads if h not in FINETUNED_HEADS]
    heads += [h for h in tcfg.heads if h in FINETUNED_HEADS and tcfg.finetune.enabled]
    for stale in HEAD_NAMES:
        if stale not in heads and (out_dir / stale / HEAD_FILE).is_file():
            shutil.rmtree(out_dir / stale)
    shutil.rmtree(out_dir / TASK_PARTS_DIR, ignore_errors=True)

    frozen = [h for h in heads if h not in TRADITIONAL_HEADS and h not in FINETUNED_HEADS]
    tasks = [{"name": f"train-{h}", "kind": "finetune", "head": h} for h in heads if h in FINETUNED_HEADS]
    deep = [{"name": f"train-{h}", "kind": "head", "head": h} for h in frozen
            if h not in ("stacking", "linear_probe", *ENSEMBLE_HEADS, *RNN_HEADS)]
    if "stacking" in frozen:
        for split in ("train", "val"):
            if len(data.y[split]) == 0:
                raise TrainError(f"the {split} split has no rows; stacking needs train rows and val rows")
        try:
            fold_assignment(data.y["train"], tcfg.stacking.folds, tcfg.seed)  # too few rows: say so before training
        except ValueError as err:
            raise TrainError(str(err)) from None
        # Stacking reuses image_only's and text_only's trained weights when they are heads of the run; a seed bag
        # (train.seeds > 1) is an average of several, not the one base model stacking holds: then it trains its own.
        deep += [{"name": f"base-{h}", "kind": "base", "head": h} for h in UNIMODAL
                 if h not in frozen or tcfg.seeds > 1]
        folds = folds_to_predict(len(data.y["train"]), tcfg.stacking.folds, tcfg.stacking.oof_rows)
        deep += [{"name": f"fold-{h}-{k}", "kind": "fold", "head": h, "fold": k}
                 for k in range(folds) for h in UNIMODAL]
    deep.sort(key=lambda t: task_cost(t, data, tcfg, len(labels)), reverse=True)  # stable: ties keep plan order
    # Before the frozen-feature heads: its RNN over every token makes it costlier than any of them.
    tasks += [{"name": f"train-{h}", "kind": "cnn_rnn", "head": h} for h in frozen if h in RNN_HEADS]
    tasks += deep
    if "stacking" in frozen:
        before = [t["name"] for t in deep if t["kind"] in ("fold", "base") or t["head"] in UNIMODAL]
        tasks.append({"name": "train-stacking", "kind": "stacking", "head": "stacking", "after": before})
    if "linear_probe" in heads:
        tasks.append({"name": "train-linear_probe", "kind": "linear_probe", "head": "linear_probe"})
    if "ensemble" in heads:
        from crossmodal.heads.registry import HEADS

        # Heads on the frozen features (heads.registry.HEADS) share one pair of encoders at serving; with
        # ensemble.pool "all" the token-level and fine-tuned heads may join them (served beside them,
        # crossmodal.serving.fused_model.EnsembleFusedModel). Traditional baselines are compared, never mixed.
        members = [h for h in frozen if h in HEADS]
        if not members:
            raise TrainError("train.heads names the ensemble but no head on frozen features for it to choose from")
        if tcfg.ensemble.pool == "all":
            members += [h for h in heads if h in RNN_HEADS or h in FINETUNED_HEADS]
        tasks.append({"name": "train-ensemble", "kind": "ensemble", "head": "ensemble", "members": members,
                      "after": [f"train-{h}" for h in members]})
    tasks += [{"name": f"train-{h}", "kind": "traditional", "head": h} for h in heads if h in TRADITIONAL_HEADS]
    job = {"validated": str(Path(validated_path).resolve()), "image": str(Path(image_path).resolve()),
           "text": str(Path(text_path).resolve()), "out_dir": str(out_dir),
           "cache_dir": None if cache_dir is None else str(Path(cache_dir).resolve()),
           "progress_dir": None if progress_dir is None else str(progress_dir),
           "train": cfg.model_dump(), "encoders": (encoders or EncodersConfig()).model_dump(), "labels": labels, "heads": heads,
           "rows": {s: int(len(data.y[s])) for s in SPLITS}}
    _DATA.clear()
    _DATA[_data_key(job)] = data  # the planning process may run tasks too: it has read the features already
    return job, tasks


_STEP_SECONDS: dict[tuple, float] = {}  # (head, sizes, batch) -> seconds per training row, for task_cost


def task_cost(task: dict, data: SplitFeatures, cfg, num_classes: int) -> float:
    """The expected seconds per epoch of a frozen-feature task, to start the longest tasks first: the time of one
    training step of its head on a batch of real rows (timed once per head and process) x the rows of an epoch (at
    most EPOCH_ROWS; a fold model trains on (K-1)/K of the train rows). Timed, not counted: parameter counts would
    rank the attention head among the cheapest, while its many small operations make it one of the slowest."""
    rows = len(data.y["train"])
    if task["kind"] == "fold":
        rows = rows * (cfg.stacking.folds - 1) // cfg.stacking.folds
    return _seconds_per_row(task["head"], data, cfg, num_classes) * min(rows, EPOCH_ROWS)


def _seconds_per_row(name: str, data: SplitFeatures, cfg, num_classes: int) -> float:
    import torch

    from crossmodal.heads.registry import build_head

    n = max(1, min(len(data.y["train"]), BatchStream(len(data.y["train"]), cfg.batch_size, None).batch_size))
    key = (name, data.image_dim, data.text_dim, num_classes, cfg.hidden_dim, n)
    if key not in _STEP_SECONDS:
        # Its own RNG state: building a head draws its initial weights, and the heads' training must not notice.
        with _TORCH, torch.random.fork_rng(devices=[]), torch_threads(TRAIN_THREADS):
            head = build_head(name, data.image_dim, data.text_dim, num_classes, cfg)
            xi = torch.from_numpy(np.ascontiguousarray(data.image["train"][:n]))
            xt = torch.from_numpy(np.ascontiguousarray(data.text["train"][:n]))
            y = torch.from_numpy(np.ascontiguousarray(data.y["train"][:n]))
            best = float("inf")
            for _ in range(3):  # the first call also sets things up: keep the fastest
                start = time.perf_counter()
                torch.nn.functional.cross_entropy(head(xi, xt), y).backward()
                best = min(best, time.perf_counter() - start)
        _STEP_SECONDS[key] = best / n
    return _STEP_SECONDS[key]


def _data_key(job: dict) -> tuple:
    views = [job["views"][f"{k}_path"] for k in ("image", "text")] if job.get("views") else []  # train.augment
    return tuple((p, Path(p).stat().st_mtime_ns) for p in (job["validated"], job["image"], job["text"], *views))


def task_data(job: dict) -> SplitFeatures:
    """The run's features as this process sees them (read once per process); TrainError if they changed since
    the run was planned (another run rewrote them meanwhile)."""
    try:
        key = _data_key(job)
    except OSError as err:
        raise TrainError(f"{err.filename} cannot be read here ({err.strerror}); every process that trains must see "
                         "the run's files at the same path (orchestration: shared storage)") from None
    if key not in _DATA:
        data, found = load_split_features(job["validated"], job["image"], job["text"], job.get("views"))
        got = {s: int(len(data.y[s])) for s in SPLITS}
        if found != job["labels"] or got != job["rows"]:
            raise TrainError(f"{job['validated']} or its features changed while training ran (labels {found}, rows "
                             f"{got}; expected {job['labels']}, {job['rows']}); run `crossmodal train` again")
        _DATA.clear()  # one run's features per process at a time
        _DATA[key] = data
    return _DATA[key]


def run_training_task(task: dict, job: dict) -> dict:
    """Run one task of :func:`plan_training` in this process; returns its small summary (paths and figures)."""
    cfg = TrainConfig.model_validate(job["train"])
    out_dir, kind, name = Path(job["out_dir"]), task["kind"], task["head"]
    start = time.perf_counter()
    if kind == "traditional":
        return _traditional(task, job, cfg, out_dir, start)
    with _TORCH:
        if kind == "finetune":
            return _finetune(task, job, cfg, out_dir, start)
        if kind == "cnn_rnn":
            return _cnn_rnn(task, job, cfg, out_dir)
        data = task_data(job)
        labels = job["labels"]
        if kind == "fold":
            from crossmodal.training.stacking import fold_probabilities

            proba = fold_probabilities(data, cfg, len(labels), task["fold"], name)
            with atomic_path(_part(out_dir, task["name"], ".npy")) as tmp, open(tmp, "wb") as fh:
                np.save(fh, proba)
            return {"name": task["name"], "head": name, "seconds": round(time.perf_counter() - start, 3)}
        if kind == "stacking":
            return _stacking(task, job, data, cfg, out_dir)
        if kind == "linear_probe":
            from crossmodal.training.linear_probe import train_linear_probe

            head, history = train_linear_probe(data, cfg, len(labels))
            return {"name": task["name"], **save_trained_head(head, history, time.perf_counter() - start, data, labels,
                                                              cfg, out_dir, family="baseline")}
        if kind == "ensemble":
            from crossmodal.heads.registry import HEADS
            from crossmodal.training.ensemble import averaged_ensemble, choose_ensemble, save_model_ensemble

            choice, history = choose_ensemble(out_dir, task["members"], data, cfg)
            if not all(n in HEADS for n in choice.weights):  # a member on other inputs: kept beside, not merged
                return {"name": task["name"], **save_model_ensemble(out_dir, choice, history, labels, cfg,
                                                                    time.perf_counter() - start)}
            return {"name": task["name"], **save_trained_head(averaged_ensemble(out_dir, choice), history,
                                                              time.perf_counter() - start, data, labels, cfg,
                                                              out_dir, family="ensemble")}
        # Only the heads themselves report epochs: a base model of stacking is an internal step of that head.
        on_epoch = epoch_writer(job["progress_dir"], name) if kind == "head" else None
        if kind == "head" and cfg.seeds > 1:
            head, history = _seed_bag(name, data, cfg, len(labels), on_epoch)
        else:
            head, history = train_head(name, data, cfg, len(labels), on_epoch)
        seconds = time.perf_counter() - start
        if kind == "base":
            from safetensors.torch import save_file

            with atomic_path(_part(out_dir, task["name"], ".safetensors")) as tmp:
                save_file({k: v.detach().contiguous() for k, v in head.state_dict().items()}, str(tmp))
            return {"name": task["name"], "head": name, "seconds": round(seconds, 3)}
        return {"name": task["name"], **save_trained_head(head, history, seconds, data, labels, cfg, out_dir)}


def _seed_bag(name: str, data: SplitFeatures, cfg: TrainConfig, num_classes: int, on_epoch):
    """Head ``name`` trained from ``train.seeds`` seeds (seed, seed + 1, ...), probabilities averaged
    (``crossmodal.heads.averaged``); the history is the first seed's, each seed's best epoch is in its records."""
    from crossmodal.heads.averaged import AveragedHead

    members, history = [], []
    for k in range(cfg.seeds):
        head, run = train_head(name, data, cfg.model_copy(update={"seed": cfg.seed + k}), num_classes,
                               on_epoch if k == 0 else None)
        members.append(head)
        history = history or run
        history[-1].setdefault("seed_best_epochs", []).append(best_epoch(run))
    return AveragedHead.seed_bag(members).eval(), history


def _part(out_dir: Path, name: str, suffix: str) -> Path:
    return out_dir / TASK_PARTS_DIR / f"{name}{suffix}"


def _stacking(task: dict, job: dict, data: SplitFeatures, cfg: TrainConfig, out_dir: Path) -> dict:
    """The stacking head from its parts: out-of-fold probabilities, base heads, meta-classifier; saved like any head.
    Its seconds here are its meta fit's; the stage's result adds those of its folds and base models."""
    from safetensors.torch import load_file

    start = time.perf_counter()
    c = len(job["labels"])
    fold = fold_assignment(data.y["train"], cfg.stacking.folds, cfg.seed)
    oof = np.full((len(fold), 2 * c), np.nan, dtype=np.float32)
    for k in range(folds_to_predict(len(fold), cfg.stacking.folds, cfg.stacking.oof_rows)):
        for column, name in enumerate(UNIMODAL):
            oof[fold == k, column * c : (column + 1) * c] = np.load(_part(out_dir, f"fold-{name}-{k}", ".npy"))
    base = {}
    for name in UNIMODAL:
        trained = out_dir / name / WEIGHTS_FILE
        reused = name in job["heads"] and cfg.seeds == 1  # as planned (plan_training)
        base[name] = load_file(str(trained if reused else _part(out_dir, f"base-{name}", ".safetensors")))
    head, history = train_stacking(data, cfg, c, base_heads=base, oof=oof)
    seconds = time.perf_counter() - start
    return {"name": task["name"], **save_trained_head(head, history, seconds, data, job["labels"], cfg, out_dir)}


def _finetune(task: dict, job: dict, cfg: TrainConfig, out_dir: Path, start: float) -> dict:
    from crossmodal.training.finetune import finetune_head

    name = task["head"]
    write = epoch_writer(job["progress_dir"], name)
    train = cfg
    if job["cache_dir"] is None and train.finetune.checkpoint_dir is None:  # not in the folder written aside below
        train = train.model_copy(deep=True)
        train.finetune.checkpoint_dir = str(out_dir / ".finetune_checkpoints")
    # One torch thread, as every task, wherever it runs: CPU kernels may split their sums by thread, so a fixed count
    # keeps the result the same on every runner; and beside the other tasks' worker processes, more threads wait on
    # each other (measured in docs/scale-out.md). The cores go to the other tasks, or to train.finetune.processes.
    with torch_threads(TRAIN_THREADS), atomic_dir(out_dir / TASK_PARTS_DIR / name) as tmp:
        info = finetune_head(job["validated"], train, EncodersConfig.model_validate(job["encoders"]), tmp, cache_dir=job["cache_dir"],
                             on_epoch_end=None if write is None else lambda epoch, row, model: write(row))
        (tmp / LABELS_FILE).unlink(missing_ok=True)  # plan_training wrote the run's labels (the same list)
        head_dir = _publish(tmp / name, out_dir / name)
    return {"name": task["name"], "dir": str(head_dir), "val_macro_f1": info["val_metrics"]["macro_f1"],
            "best_epoch": info["best_epoch"], "epochs_run": info["epochs_run"], "seconds": info["train_seconds"],
            "processes": info.get("processes", 1)}


def _cnn_rnn(task: dict, job: dict, cfg: TrainConfig, out_dir: Path) -> dict:
    from crossmodal.training.cnn_rnn import save_cnn_rnn, train_cnn_rnn

    data = task_data(job)
    trained = train_cnn_rnn(job["validated"], data, cfg, EncodersConfig.model_validate(job["encoders"]),
                            len(job["labels"]), epoch_writer(job["progress_dir"], task["head"]))
    return {"name": task["name"], **save_cnn_rnn(trained, data, job["labels"], cfg, out_dir)}


def _traditional(task: dict, job: dict, cfg: TrainConfig, out_dir: Path, start: float) -> dict:
    from crossmodal.training.traditional import train_traditional

    name = task["head"]
    data = task_data(job)
    with atomic_dir(out_dir / TASK_PARTS_DIR / name) as tmp:
        info = train_traditional(job["validated"], data, job["labels"], cfg, tmp, [name])[name]
        head_dir = _publish(tmp / name, out_dir / name)
    return {"name": task["name"], "dir": str(head_dir), "val_macro_f1": info["val_metrics"]["macro_f1"],
            "best_epoch": info["best_epoch"], "epochs_run": info["epochs_run"],
            "seconds": round(time.perf_counter() - start, 3)}


def _publish(src: Path, dst: Path) -> Path:
    """Move a finished head folder into place whole (see ``crossmodal.files.atomic_dir``)."""
    with atomic_dir(dst) as tmp:
        tmp.rmdir()
        src.rename(tmp)
    return dst


def save_trained_head(head, history: list[dict], seconds: float, data: SplitFeatures, labels: list[str], cfg,
                      out_dir, family: str = "frozen") -> dict:
    """Predict the val and test rows (also with each modality removed, and the gates of gated heads), write
    ``<out_dir>/<name>/`` whole (weights, head.json, predictions.npz); returns the head's summary."""
    from crossmodal.evaluation.metrics import compute_metrics

    name = head.init_args["name"]
    with torch_threads(TRAIN_THREADS):
        proba = {s: predict_proba(head, data.image[s], data.text[s]) for s in ("val", "test")}
        ti, tt = data.image["test"], data.text["test"]
        robustness = {"test_proba_missing_text": predict_proba(head, ti, without(tt)),
                      "test_proba_missing_image": predict_proba(head, without(ti), tt)}
        gates = predict_gates(head, ti, tt)
    if gates is not None:
        robustness["test_gate"] = gates
    val_metrics = compute_metrics(data.y["val"], proba["val"], labels)
    info = {
        "best_epoch": best_epoch(history),
        "epochs_run": len(history),
        "train_seconds": round(seconds, 3),
        "val_metrics": val_metrics,
        "history": history,
        "labels": labels,
        "config": cfg.model_dump(),
        "family": family,
    }
    with atomic_dir(Path(out_dir) / name) as tmp:
        save_head(head, tmp, info)
        np.savez(
            tmp / PREDICTIONS_FILE,
            **{f"{s}_proba": proba[s] for s in ("val", "test")},
            **{f"{s}_y": data.y[s] for s in ("val", "test")},
            **{f"{s}_ids": data.ids[s].astype(str) for s in ("val", "test")},
            **robustness,
        )
    return {"head": name, "dir": str(Path(out_dir) / name), "val_macro_f1": val_metrics["macro_f1"],
            "best_epoch": info["best_epoch"], "epochs_run": info["epochs_run"], "seconds": round(seconds, 3)}
