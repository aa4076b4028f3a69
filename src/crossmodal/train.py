"""Train fusion heads on frozen features: one loop for every head.

    from crossmodal.train import train_all, load_head
    result = train_all("work/validated.parquet", "work/features/image.npy", "work/features/text.npy",
                       cfg.train, out_dir="work/train")
    head = load_head("work/train/gated")          # nn.Module in eval mode

What ``train_all`` writes under ``out_dir``:
    labels.json                    sorted label strings; class index = position in this list
    <head>/weights.safetensors     state dict (weights + Standardize buffers), never pickle
    <head>/head.json               name, modality, init_args, best_epoch, epochs_run, history, val metrics
    <head>/predictions.npz         val_/test_ proba (N, C) float32, y int64, ids str

The loop: cross-entropy (optionally with balanced class weights), mini-batches from a
seeded generator, validation after every epoch, early stopping on validation macro-F1
with ``cfg.patience``, and the best epoch's weights restored at the end. Features are
small, so everything runs on the CPU in full precision; with one seed a run is
reproducible to the bit on the same machine.
"""

from __future__ import annotations

import copy
import json
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from crossmodal.config import EncodersConfig, TrainConfig

SPLITS = ("train", "val", "test")
OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
WEIGHTS_FILE = "weights.safetensors"
HEAD_FILE = "head.json"
PREDICTIONS_FILE = "predictions.npz"
LABELS_FILE = "labels.json"
TRAIN_THREADS = 1  # see torch_threads()


class TrainError(ValueError):
    """Inputs to training are inconsistent (names the file, the column or the split, and what to do)."""


@dataclass
class SplitFeatures:
    """Features and integer labels per split: ``image["train"]`` is (n_train, Di) float32, and so on."""

    image: dict[str, np.ndarray]
    text: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    ids: dict[str, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_arrays(cls, image, text, y, split, ids=None) -> SplitFeatures:
        """Cut row-aligned arrays by a split column ("train" / "val" / "test" per row)."""
        image, text = np.asarray(image, dtype=np.float32), np.asarray(text, dtype=np.float32)
        y, split = np.asarray(y, dtype=np.int64), np.asarray(split).astype(str)
        ids = np.asarray([f"row-{i}" for i in range(len(y))] if ids is None else ids).astype(str)
        if image.ndim != 2 or text.ndim != 2:
            raise TrainError(f"features must be 2-D (rows, dims); got image {image.shape}, text {text.shape}")
        if not len(image) == len(text) == len(y) == len(split) == len(ids):
            raise TrainError(
                f"row counts differ: image {len(image)}, text {len(text)}, labels {len(y)}, splits {len(split)}"
            )
        unknown = sorted(set(split) - set(SPLITS))
        if unknown:
            raise TrainError(f"unknown split value(s) {unknown}; expected one of {list(SPLITS)}")
        masks = {s: split == s for s in SPLITS}
        return cls(
            image={s: image[m] for s, m in masks.items()},
            text={s: text[m] for s, m in masks.items()},
            y={s: y[m] for s, m in masks.items()},
            ids={s: ids[m] for s, m in masks.items()},
        )

    @property
    def image_dim(self) -> int:
        return int(self.image["train"].shape[1])

    @property
    def text_dim(self) -> int:
        return int(self.text["train"].shape[1])


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

    def to_dict(self) -> dict:
        return asdict(self)


# ---------------------------------------------------------------- pieces of the loop


def balanced_class_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """n / (C * count_c), as sklearn's "balanced"; a class absent from train gets weight 0 (it has no rows)."""
    counts = np.bincount(np.asarray(y, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.where(counts > 0, len(y) / (num_classes * np.maximum(counts, 1)), 0.0)
    return weights.astype(np.float32)


def make_optimizer(name: str, params, lr: float, weight_decay: float):
    import torch

    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; set train.optimizer to one of {list(OPTIMIZERS)}")


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, average="macro", zero_division=0))


def is_better(f1: float, loss: float, best_f1: float, best_loss: float) -> bool:
    """Higher validation macro-F1 wins; on an exact tie, lower validation loss (better calibrated)."""
    return f1 > best_f1 + 1e-12 or (abs(f1 - best_f1) <= 1e-12 and loss < best_loss)


def predict_proba(head, image: np.ndarray, text: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Softmax probabilities (N, C) float32 in eval mode, batched to bound memory."""
    import torch

    head.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(image), batch_size):
            xi = torch.from_numpy(np.ascontiguousarray(image[i : i + batch_size], dtype=np.float32))
            xt = torch.from_numpy(np.ascontiguousarray(text[i : i + batch_size], dtype=np.float32))
            out.append(torch.softmax(head(xi, xt), dim=1).numpy())
    if not out:
        n_classes = head.init_args["num_classes"]
        return np.zeros((0, n_classes), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


# ---------------------------------------------------------------- training


@contextmanager
def torch_threads(n: int):
    """Run torch on ``n`` intra-op threads inside the block, then restore the previous setting.

    Why 1 thread for training: the matrices here are tiny (a batch of 64), so threading
    gains ~20% on an idle 2-core machine, but when anything else is running (an MLflow
    server, feature extraction) OpenMP threads wait on each other and an epoch becomes
    10-50x slower. One thread is also bit-reproducible regardless of the core count.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_head(name: str, data: SplitFeatures, cfg: TrainConfig, num_classes: int):
    """Train head ``name``; returns ``(head, history)`` with the best epoch's weights loaded, in eval mode.

    ``history`` has one dict per epoch run: epoch (1-based), train_loss, val_loss, val_macro_f1.
    The best epoch is the one with the highest val_macro_f1 (ties: lower val_loss); see :func:`best_epoch`.
    """
    with torch_threads(TRAIN_THREADS):
        return _train_head(name, data, cfg, num_classes)


def _train_head(name: str, data: SplitFeatures, cfg: TrainConfig, num_classes: int):
    import torch
    from torch import nn

    from crossmodal.fusion import build_head, fit_standardizers

    for split in ("train", "val"):
        if len(data.y[split]) == 0:
            raise TrainError(f"the {split} split has no rows; training needs train rows and val rows (early stopping)")

    torch.manual_seed(cfg.seed)  # per head: a head's result does not depend on which heads ran before it
    head = build_head(name, data.image_dim, data.text_dim, num_classes, cfg)
    fit_standardizers(head, data.image["train"], data.text["train"])

    def tensor(a, dtype=torch.float32):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    xi, xt, y = tensor(data.image["train"]), tensor(data.text["train"]), tensor(data.y["train"], torch.int64)
    vi, vt, vy = tensor(data.image["val"]), tensor(data.text["val"]), tensor(data.y["val"], torch.int64)
    weight = tensor(balanced_class_weights(data.y["train"], num_classes)) if cfg.class_weights else None
    criterion = nn.CrossEntropyLoss(weight=weight)
    optimizer = make_optimizer(cfg.optimizer, head.parameters(), cfg.lr, cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)  # batch order: independent of the global RNG
    custom_loss = getattr(head, "loss", None)  # late fusion trains its two classifiers on their own losses

    n = len(y)
    history: list[dict] = []
    best_f1, best_loss, best_state, stale = -1.0, float("inf"), None, 0
    for epoch in range(1, cfg.max_epochs + 1):
        head.train()
        total = 0.0
        for idx in torch.randperm(n, generator=generator).split(cfg.batch_size):
            optimizer.zero_grad(set_to_none=True)
            bi, bt, by = xi[idx], xt[idx], y[idx]
            loss = custom_loss(bi, bt, by, criterion) if custom_loss else criterion(head(bi, bt), by)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)

        head.eval()
        with torch.no_grad():
            val_logits = head(vi, vt)
            val_loss = float(criterion(val_logits, vy))
        val_f1 = macro_f1(data.y["val"], val_logits.argmax(1).numpy())
        history.append(
            {"epoch": epoch, "train_loss": total / n, "val_loss": val_loss, "val_macro_f1": val_f1}
        )
        if not np.isfinite(total):
            raise TrainError(
                f"head {name!r}: training loss became {total} at epoch {epoch}; lower train.lr (now {cfg.lr})"
            )
        # Patience counts epochs without a macro-F1 gain; an equal F1 with a lower loss still becomes
        # the kept state, but does not reset the count (a flat F1 must end training).
        stale = 0 if val_f1 > best_f1 + 1e-12 else stale + 1
        if is_better(val_f1, val_loss, best_f1, best_loss):
            best_f1, best_loss = val_f1, val_loss
            best_state = copy.deepcopy(head.state_dict())
        if stale >= cfg.patience:
            break

    head.load_state_dict(best_state)
    if hasattr(head, "fit_on_validation"):
        head.fit_on_validation(vi, vt, data.y["val"])
    head.eval()
    return head, history


def best_epoch(history: list[dict]) -> int:
    """The epoch whose weights :func:`train_head` kept (same rule as the loop)."""
    best, best_f1, best_loss = 0, -1.0, float("inf")
    for h in history:
        if is_better(h["val_macro_f1"], h["val_loss"], best_f1, best_loss):
            best, best_f1, best_loss = h["epoch"], h["val_macro_f1"], h["val_loss"]
    return best


# ---------------------------------------------------------------- saving and loading


def save_head(head, directory: str | Path, info: dict | None = None) -> Path:
    """Write ``weights.safetensors`` and ``head.json`` (name, modality, init_args + ``info``) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in head.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"head": head.init_args["name"]})
    meta = {"name": head.init_args["name"], "modality": head.modality, "init_args": head.init_args, **(info or {})}
    (directory / HEAD_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_head(directory: str | Path):
    """Rebuild a head from ``head.json`` and load ``weights.safetensors``; returned in eval mode."""
    from safetensors.torch import load_file

    from crossmodal.fusion import build_head

    directory = Path(directory)
    for fname in (HEAD_FILE, WEIGHTS_FILE):
        if not (directory / fname).is_file():
            raise FileNotFoundError(f"{directory / fname} is missing; run `crossmodal train` to create the head")
    meta = json.loads((directory / HEAD_FILE).read_text())
    head = build_head(**meta["init_args"])
    try:
        head.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    except RuntimeError as err:
        raise TrainError(f"{directory / WEIGHTS_FILE} does not match {directory / HEAD_FILE}: {err}") from None
    return head.eval()


# ---------------------------------------------------------------- the stage


def load_split_features(validated_path, image_features_path, text_features_path) -> tuple[SplitFeatures, list[str]]:
    """Read validated.parquet and the two feature files (rows aligned) into a SplitFeatures + sorted labels."""
    import pandas as pd

    validated_path = Path(validated_path)
    if not validated_path.is_file():
        raise TrainError(f"{validated_path} not found; run `crossmodal validate` first")
    df = pd.read_parquet(validated_path)
    missing = [c for c in ("id", "label", "split") if c not in df.columns]
    if missing:
        raise TrainError(f"{validated_path} lacks column(s) {missing}; re-run `crossmodal validate`")

    feats = {}
    for kind, path in (("image", image_features_path), ("text", text_features_path)):
        path = Path(path)
        if not path.is_file():
            raise TrainError(f"{kind} features {path} not found; run `crossmodal extract` first")
        arr = np.load(path, allow_pickle=False)
        if arr.ndim != 2 or len(arr) != len(df):
            raise TrainError(
                f"{kind} features {path} have shape {arr.shape} but {validated_path} has {len(df)} rows; "
                "the features are stale: re-run `crossmodal extract`"
            )
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            first = df["id"].iloc[int(np.argmax(bad))]
            raise TrainError(
                f"{kind} features {path} hold NaN/inf in {int(bad.sum())} row(s), first id {first!r}; "
                "re-run `crossmodal extract` (and check that row's input)"
            )
        feats[kind] = arr.astype(np.float32, copy=False)

    labels_str = df["label"].astype(str)
    labels = sorted(labels_str.unique())
    if len(labels) < 2:
        raise TrainError(f"{validated_path} has {len(labels)} label(s) {labels}; a classifier needs at least 2")
    y = labels_str.map({label: i for i, label in enumerate(labels)}).to_numpy(np.int64)
    split, ids = df["split"].astype(str).to_numpy(), df["id"].astype(str).to_numpy()
    data = SplitFeatures.from_arrays(feats["image"], feats["text"], y, split, ids)
    return data, labels


def train_all(validated_path, image_features_path, text_features_path, cfg: TrainConfig, out_dir,
              encoders: EncodersConfig | None = None, cache_dir=None) -> TrainResult:
    """Train every head in ``cfg.heads`` and write their weights, metadata and predictions under ``out_dir``.

    The fine-tuned head (``finetune_xattn``, when ``cfg.finetune.enabled``) trains last, from the raw images and
    texts of ``validated_path`` with the encoders named in ``encoders`` (defaults when None); its checkpoints go
    under ``cache_dir`` (see ``crossmodal.finetune``).
    """
    import shutil

    from crossmodal.config import FINETUNED_HEADS, HEAD_NAMES
    from crossmodal.evaluate import compute_metrics

    data, labels = load_split_features(validated_path, image_features_path, text_features_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LABELS_FILE).write_text(json.dumps(labels, indent=2))
    # Fine-tuned heads last (the slowest), and only when enabled.
    heads = [h for h in cfg.heads if h not in FINETUNED_HEADS]
    heads += [h for h in cfg.heads if h in FINETUNED_HEADS and cfg.finetune.enabled]
    # A head trained by an earlier run but not by this one would otherwise be evaluated as if current.
    for stale_name in HEAD_NAMES:
        if stale_name not in heads and (out_dir / stale_name / HEAD_FILE).is_file():
            shutil.rmtree(out_dir / stale_name)

    rows = {s: int(len(data.y[s])) for s in SPLITS}
    result = TrainResult(out_dir=str(out_dir), labels=labels, heads=heads, rows=rows)
    for name in heads:
        if name in FINETUNED_HEADS:
            from crossmodal.finetune import finetune_head

            info = finetune_head(validated_path, cfg, encoders or EncodersConfig(), out_dir, cache_dir=cache_dir)
            result.head_dirs[name] = str(out_dir / name)
            result.val_macro_f1[name] = info["val_metrics"]["macro_f1"]
            result.best_epoch[name], result.epochs_run[name] = info["best_epoch"], info["epochs_run"]
            result.seconds[name] = info["train_seconds"]
            continue
        start = time.perf_counter()
        head, history = train_head(name, data, cfg, len(labels))
        seconds = time.perf_counter() - start
        with torch_threads(TRAIN_THREADS):
            proba = {s: predict_proba(head, data.image[s], data.text[s]) for s in ("val", "test")}
        val_metrics = compute_metrics(data.y["val"], proba["val"], labels)
        info = {
            "best_epoch": best_epoch(history),
            "epochs_run": len(history),
            "train_seconds": round(seconds, 3),
            "val_metrics": val_metrics,
            "history": history,
            "labels": labels,
            "config": cfg.model_dump(),
        }
        head_dir = save_head(head, out_dir / name, info)
        np.savez(
            head_dir / PREDICTIONS_FILE,
            **{f"{s}_proba": proba[s] for s in ("val", "test")},
            **{f"{s}_y": data.y[s] for s in ("val", "test")},
            **{f"{s}_ids": data.ids[s].astype(str) for s in ("val", "test")},
        )
        result.head_dirs[name] = str(head_dir)
        result.val_macro_f1[name] = val_metrics["macro_f1"]
        result.best_epoch[name] = info["best_epoch"]
        result.epochs_run[name] = info["epochs_run"]
        result.seconds[name] = round(seconds, 3)
    return result
