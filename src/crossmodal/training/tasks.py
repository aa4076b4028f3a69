"""The frozen-feature heads of one ``train_all`` run, as independent tasks that any process can run.

    from crossmodal.training.frozen import train_frozen_heads
    summaries, workers = train_frozen_heads(["concat", "stacking"], data, labels, cfg, out_dir, sources)
    summaries["concat"]      # {"dir", "val_macro_f1", "best_epoch", "epochs_run", "seconds"}

A task is a tuple:

    ("head", name)       train head ``name``, predict its val and test rows, write ``<out_dir>/<name>/``;
                         returns its summary (and its weights when stacking reuses them)
    ("base", name)       train ``image_only`` / ``text_only`` for stacking alone (not a requested head): weights
    ("fold", name, k)    stacking: ``image_only`` / ``text_only`` trained without fold ``k`` of the train split,
                         its probabilities for fold ``k`` (crossmodal.training.stacking.fold_probabilities)

The tasks run on ``train.workers`` processes at once (``crossmodal.training.pool``); the stacking head is put together
in this process once its folds and base heads are done (its meta-classifier is small). Every task seeds itself, so
the files written are the same, to the bit, with one process or several.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from crossmodal.artifacts import PREDICTIONS_FILE
from crossmodal.data.split import SPLITS
from crossmodal.errors import TrainError
from crossmodal.heads.files import save_head
from crossmodal.heads.inference import predict_gates, predict_proba, without
from crossmodal.heads.stacking import UNIMODAL
from crossmodal.training.dataset import SplitFeatures, load_split_features
from crossmodal.training.loop import EPOCH_ROWS, TRAIN_THREADS, BatchStream, best_epoch, torch_threads, train_head
from crossmodal.training.progress import epoch_writer
from crossmodal.training.stacking import fold_assignment, folds_to_predict, train_stacking


def plan_tasks(heads: list[str], data: SplitFeatures, cfg) -> list[tuple]:
    """The tasks that train ``heads`` (frozen-feature heads only), stacking's folds and base heads included."""
    tasks: list[tuple] = [("head", name) for name in heads if name != "stacking"]
    if "stacking" in heads:
        n_train = len(data.y["train"])
        for split in ("train", "val"):
            if len(data.y[split]) == 0:
                raise TrainError(f"the {split} split has no rows; stacking needs train rows and val rows")
        try:
            fold_assignment(data.y["train"], cfg.stacking.folds, cfg.seed)  # too few rows: say so before training
        except ValueError as err:
            raise TrainError(str(err)) from None
        tasks += [("base", name) for name in UNIMODAL if name not in heads]
        folds = folds_to_predict(n_train, cfg.stacking.folds, cfg.stacking.oof_rows)
        tasks += [("fold", name, k) for k in range(folds) for name in UNIMODAL]
    return tasks


_STEP_SECONDS: dict[tuple, float] = {}  # (head, sizes, batch) -> seconds per training row, for task_cost


def task_cost(task: tuple, data: SplitFeatures, cfg, num_classes: int) -> float:
    """The expected seconds per epoch of a task, to start the longest tasks first: the time of one training step
    of its head on a batch of real rows (timed once per head and process) x the rows of an epoch (at most
    EPOCH_ROWS; a fold model trains on (K-1)/K of the train rows). Timed, not counted: parameter counts would rank
    the attention head among the cheapest, while its many small operations make it one of the slowest."""
    rows = len(data.y["train"])
    if task[0] == "fold":
        rows = rows * (cfg.stacking.folds - 1) // cfg.stacking.folds
    return _seconds_per_row(task[1], data, cfg, num_classes) * min(rows, EPOCH_ROWS)


def _seconds_per_row(name: str, data: SplitFeatures, cfg, num_classes: int) -> float:
    import torch

    from crossmodal.heads.registry import build_head

    n = max(1, min(len(data.y["train"]), BatchStream(len(data.y["train"]), cfg.batch_size, None).batch_size))
    key = (name, data.image_dim, data.text_dim, num_classes, cfg.hidden_dim, n)
    if key not in _STEP_SECONDS:
        # Its own RNG state: building a head draws its initial weights, and the heads' training must not notice.
        with torch.random.fork_rng(devices=[]), torch_threads(TRAIN_THREADS):
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


def run_task(task: tuple, data: SplitFeatures, context: dict) -> dict:
    """Run one task (see the module docstring) in this process; ``context``: cfg, labels, out_dir, keep_weights."""
    from crossmodal.training.stacking import fold_probabilities

    cfg, labels = context["cfg"], context["labels"]
    kind, name = task[0], task[1]
    start = time.perf_counter()
    if kind == "fold":
        proba = fold_probabilities(data, cfg, len(labels), task[2], name)
        return {"proba": proba, "seconds": time.perf_counter() - start}
    # Only the heads themselves report epochs: a base model of stacking is an internal step of that head.
    on_epoch = epoch_writer(context.get("progress_dir"), name) if kind == "head" else None
    head, history = train_head(name, data, cfg, len(labels), on_epoch)
    seconds = time.perf_counter() - start
    out: dict = {"seconds": seconds}
    if kind == "head":
        out.update(save_trained_head(head, history, seconds, data, labels, cfg, context["out_dir"]))
    if kind == "base" or name in context["keep_weights"]:
        out["weights"] = {k: v.detach().clone() for k, v in head.state_dict().items()}
    return out


def save_trained_head(head, history: list[dict], seconds: float, data: SplitFeatures, labels: list[str], cfg,
                      out_dir) -> dict:
    """Predict the val and test rows (also with each modality removed, and the gates of gated heads), write
    ``<out_dir>/<name>/`` (weights, head.json, predictions.npz); returns the head's summary."""
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
        "family": "frozen",
    }
    head_dir = save_head(head, Path(out_dir) / name, info)
    np.savez(
        head_dir / PREDICTIONS_FILE,
        **{f"{s}_proba": proba[s] for s in ("val", "test")},
        **{f"{s}_y": data.y[s] for s in ("val", "test")},
        **{f"{s}_ids": data.ids[s].astype(str) for s in ("val", "test")},
        **robustness,
    )
    return {"dir": str(head_dir), "val_macro_f1": val_metrics["macro_f1"], "best_epoch": info["best_epoch"],
            "epochs_run": info["epochs_run"], "seconds": round(seconds, 3)}


def finish_stacking(results: dict, data: SplitFeatures, labels: list[str], cfg, out_dir) -> dict:
    """The stacking head from its finished tasks: out-of-fold probabilities, base heads, meta-classifier; saved
    like any head. Its seconds are those of its folds (and base heads trained for it alone) plus the meta fit."""
    start = time.perf_counter()
    c = len(labels)
    fold = fold_assignment(data.y["train"], cfg.stacking.folds, cfg.seed)
    oof = np.full((len(fold), 2 * c), np.nan, dtype=np.float32)
    spent = 0.0
    for (kind, name, *rest), result in results.items():
        if kind == "fold":
            column = UNIMODAL.index(name)
            oof[fold == rest[0], column * c : (column + 1) * c] = result["proba"]
        if kind in ("fold", "base"):
            spent += result["seconds"]
    base = {name: (results.get(("head", name)) or results[("base", name)])["weights"] for name in UNIMODAL}
    head, history = train_stacking(data, cfg, c, base_heads=base, oof=oof)
    seconds = spent + time.perf_counter() - start
    return save_trained_head(head, history, seconds, data, labels, cfg, out_dir)


def load_worker_data(validated_path, image_path, text_path, labels: list[str], rows: dict) -> SplitFeatures:
    """A worker's copy of the run's features, read from the same files; TrainError if they changed meanwhile."""
    data, found = load_split_features(validated_path, image_path, text_path)
    got = {s: int(len(data.y[s])) for s in SPLITS}
    if found != labels or got != rows:
        raise TrainError(f"{validated_path} or its features changed while training ran (labels {found}, rows "
                           f"{got}; expected {labels}, {rows}); run `crossmodal train` again")
    return data


def train_frozen_heads(heads: list[str], data: SplitFeatures, labels: list[str], cfg, out_dir,
                       sources: tuple, progress_dir: str | None = None) -> tuple[dict[str, dict], int]:
    """Train and save every head in ``heads`` (frozen-feature heads); returns ({head: summary}, processes used).

    With ``progress_dir`` each head appends its epochs there as it trains (``crossmodal.training.progress``).

    ``sources`` = (validated.parquet, image.npy, text.npy) that ``data`` was read from: worker processes read
    them again (see crossmodal.training.pool).
    """
    from crossmodal.training.pool import plan_workers, run_tasks

    tasks = plan_tasks(heads, data, cfg)
    rows = {s: int(len(data.y[s])) for s in SPLITS}
    workers, cost = 1, None
    if cfg.workers != 1 and len(tasks) > 1:
        def cost(task):
            return task_cost(task, data, cfg, len(labels))

        # Every head runs at least patience + 1 epochs (its best one, then patience more): a lower bound.
        work = sum(cost(task) for task in tasks) * min(cfg.max_epochs, cfg.patience + 1)
        data_bytes = sum(a.nbytes for part in (data.image, data.text) for a in part.values())
        workers = plan_workers(cfg.workers, work, len(tasks), data_bytes)
    context = {"cfg": cfg, "labels": labels, "out_dir": str(out_dir), "progress_dir": progress_dir,
               "keep_weights": set(UNIMODAL) if "stacking" in heads else set()}
    load = (load_worker_data, (*(str(p) for p in sources), labels, rows))
    results = run_tasks(tasks, run_task, data, context, workers, load=load, cost=cost)
    summaries = {}
    if "stacking" in heads:
        summaries["stacking"] = finish_stacking(results, data, labels, cfg, out_dir)
    for name in heads:
        if name != "stacking":
            summaries[name] = {k: v for k, v in results[("head", name)].items() if k != "weights"}
    return {name: summaries[name] for name in heads}, workers
