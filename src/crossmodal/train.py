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
    traditional_*/                 head.json (family "traditional") + predictions.npz, no weights: scikit-learn
                                   baselines for the comparison (crossmodal.traditional), never registered
    <head>/predictions.npz         val_/test_ proba (N, C) float32, y int64, ids str; test_proba_missing_text and
                                   test_proba_missing_image (the test rows with that modality removed);
                                   test_gate (N, 2) [image, text] for heads with gates

The loop: cross-entropy or focal loss (``train.loss``; optionally with balanced class weights),
optional auxiliary unimodal losses and OGM-GE gradient modulation (crossmodal.modality, their
per-modality scores and coefficients added to each epoch's history), mini-batches from a
seeded generator, validation after every epoch, early stopping on validation macro-F1
with ``cfg.patience``, and the best epoch's weights restored at the end. With
``cfg.modality_dropout`` > 0 each training row's image or text is hidden (set to NaN, the
missing-modality marker) with that chance per step, never both, so the fusion heads learn to
predict from one modality when the other is absent (unimodal and late-fusion heads train as
without it). Features are
small, so everything runs on the CPU in full precision; with one seed a run is
reproducible to the bit on the same machine.

The frozen-feature heads are independent of each other (stacking's folds too): ``train_all`` trains them on
``train.workers`` processes at once, one torch thread each (crossmodal.train_heads, crossmodal.train_pool), and
writes the same files, to the bit, as with one process.
"""

from __future__ import annotations

import copy
import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from crossmodal.config import EncodersConfig, TrainConfig
from crossmodal.head_files import HEAD_FILE, WEIGHTS_FILE, load_head, save_head  # noqa: F401  (re-exported)
from crossmodal.train_data import SPLITS, SplitFeatures, TrainError, load_split_features  # noqa: F401  (re-exported)

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
PREDICTIONS_FILE = "predictions.npz"
LABELS_FILE = "labels.json"
TRAIN_THREADS = 1  # see torch_threads()
# A training set larger than this is trained in "epochs" of this many rows (see BatchStream), with batches scaled up.
EPOCH_ROWS = 8_192
# Validation runs the head over the val rows in blocks of this many: the logits are the same to the bit as in one
# block (every row is computed on its own), and blocks that stay in the CPU cache took 30-40% less time per
# validation on 7,500 rows (2-core CPU).
VAL_BATCH = 1_024


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
    workers: int = 1  # processes that trained the frozen-feature heads at once (train.workers)

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


def modality_dropout(image, text, rate: float, generator):
    """Hide each row's image, or its text, with chance ``rate`` (rows set to NaN); never both of one row.

    A row already missing one modality never loses the other. When both are drawn, a coin picks which
    one goes, so either modality is hidden with chance ``rate - rate**2 / 2``. Returns new tensors.
    """
    import torch

    if rate <= 0:
        return image, text
    n = image.shape[0]
    has_image, has_text = ~torch.isnan(image).all(dim=1), ~torch.isnan(text).all(dim=1)
    draw_image = torch.rand(n, generator=generator) < rate
    draw_text = torch.rand(n, generator=generator) < rate
    coin = torch.rand(n, generator=generator) < 0.5
    both = draw_image & draw_text
    drop_image = (draw_image & ~(both & coin)) & has_text
    drop_text = (draw_text & ~(both & ~coin)) & has_image
    nan = torch.tensor(float("nan"), dtype=image.dtype)
    return torch.where(drop_image[:, None], nan, image), torch.where(drop_text[:, None], nan, text)


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


def without(features: np.ndarray) -> np.ndarray:
    """The same rows with the modality absent (all NaN)."""
    return np.full_like(features, np.nan, dtype=np.float32)


def predict_gates(head, image: np.ndarray, text: np.ndarray, batch_size: int = 4096) -> np.ndarray | None:
    """Per-row [image, text] gate weights (N, 2) float32 for heads with gates; None for the others."""
    import torch

    if not getattr(head, "has_gates", False):
        return None
    head.eval()
    out = [np.zeros((0, 2), dtype=np.float32)]
    with torch.no_grad():
        for i in range(0, len(image), batch_size):
            xi = torch.from_numpy(np.ascontiguousarray(image[i : i + batch_size], dtype=np.float32))
            xt = torch.from_numpy(np.ascontiguousarray(text[i : i + batch_size], dtype=np.float32))
            out.append(head(xi, xt, return_gates=True)[1].numpy())
    return np.concatenate(out).astype(np.float32)


# ---------------------------------------------------------------- training


class BatchStream:
    """Shuffled mini-batch indices, one epoch at a time.

    Up to EPOCH_ROWS training rows, an epoch is one shuffled pass in batches of ``batch_size``, as usual.
    Beyond that, an epoch is EPOCH_ROWS rows taken from consecutive shuffled passes (every row is still seen
    once per pass), in batches of ``batch_size`` x (rows / EPOCH_ROWS) rounded down to a power of two, at most
    8x. Why: on 50,000 rows a whole pass per validation makes early stopping wait ``patience`` whole passes
    after the best one, and batches of 64 spend more time in per-step overhead than in arithmetic. Measured on
    50,000 rows (concat + attention heads, 2-core CPU): 120 s with whole passes in batches of 64, 22 s with
    8,192-row epochs in batches of 256, the same validation macro-F1 (0.98).
    """

    def __init__(self, n: int, batch_size: int, generator, epoch_rows: int | None = None):
        self.n, self.generator = n, generator
        self.epoch_rows = epoch_rows = epoch_rows or EPOCH_ROWS
        scale = 1 if n <= epoch_rows else min(8, 1 << (n // epoch_rows).bit_length() - 1)
        self.batch_size = batch_size * scale
        self._perm, self._pos = None, 0

    def epoch(self) -> list:
        import torch

        if self.n <= self.epoch_rows:  # one pass: the same random stream as a plain randperm per epoch
            return list(torch.randperm(self.n, generator=self.generator).split(self.batch_size))
        parts, need = [], self.epoch_rows
        while need:
            if self._perm is None or self._pos == self.n:
                self._perm, self._pos = torch.randperm(self.n, generator=self.generator), 0
            take = self._perm[self._pos : self._pos + need]
            parts.append(take)
            self._pos += len(take)
            need -= len(take)
        return list(torch.cat(parts).split(self.batch_size))



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

    ``history`` has one dict per epoch run: epoch (1-based), train_loss, val_loss, val_macro_f1 (and, with
    auxiliary losses or OGM-GE on, score_image, score_text, ratio_image_text, coeff_*, aux_loss).
    The best epoch is the one with the highest val_macro_f1 (ties: lower val_loss); see :func:`best_epoch`.
    """
    with torch_threads(TRAIN_THREADS):
        return _train_head(name, data, cfg, num_classes)


def _train_head(name: str, data: SplitFeatures, cfg: TrainConfig, num_classes: int):
    import torch

    from crossmodal.fusion import build_head, fit_standardizers
    from crossmodal.losses import make_criterion
    from crossmodal.modality import ModalityBalancer

    for split in ("train", "val"):
        if len(data.y[split]) == 0:
            raise TrainError(f"the {split} split has no rows; training needs train rows and val rows (early stopping)")

    torch.manual_seed(cfg.seed)  # per head: a head's result does not depend on which heads ran before it
    head = build_head(name, data.image_dim, data.text_dim, num_classes, cfg)
    fit_standardizers(head, data.image["train"], data.text["train"], statistics=data.statistics)

    def tensor(a, dtype=torch.float32):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    xi, xt, y = tensor(data.image["train"]), tensor(data.text["train"]), tensor(data.y["train"], torch.int64)
    vi, vt, vy = tensor(data.image["val"]), tensor(data.text["val"]), tensor(data.y["val"], torch.int64)
    weight = tensor(balanced_class_weights(data.y["train"], num_classes)) if cfg.class_weights else None
    criterion = make_criterion(cfg, weight)
    balancer = ModalityBalancer.for_head(head, cfg)  # None unless aux losses / OGM-GE are on for a fusion head
    optimizer = make_optimizer(cfg.optimizer, head.parameters(), cfg.lr, cfg.weight_decay)
    generator = torch.Generator().manual_seed(cfg.seed)  # batch order: independent of the global RNG
    dropper = torch.Generator().manual_seed(cfg.seed + 1)  # its own stream: dropout leaves batch order alone
    # Only heads that fuse features learn from hidden modalities: a unimodal head would only see its input
    # replaced by noise, and late fusion already decides a one-modality row by the present classifier alone.
    learns_missing = head.modality == "fusion" and not getattr(head, "decides_missing_alone", False)
    drop_rate = cfg.modality_dropout if learns_missing else 0.0
    custom_loss = getattr(head, "loss", None)  # late fusion trains its two classifiers on their own losses

    n = len(y)
    batches = BatchStream(n, cfg.batch_size, generator)
    history: list[dict] = []
    best_f1, best_loss, best_state, stale = -1.0, float("inf"), None, 0
    for epoch in range(1, cfg.max_epochs + 1):
        head.train()
        total = 0.0
        for idx in batches.epoch():
            optimizer.zero_grad(set_to_none=True)
            bi, bt, by = xi[idx], xt[idx], y[idx]
            bi, bt = modality_dropout(bi, bt, drop_rate, dropper)
            loss = custom_loss(bi, bt, by, criterion) if custom_loss else criterion(head(bi, bt), by)
            if balancer is not None:
                loss = loss + balancer.batch(bi, bt, by, criterion)
            loss.backward()
            if balancer is not None:
                balancer.modulate()
            optimizer.step()
            total += loss.item() * len(idx)

        head.eval()
        with torch.no_grad():
            val_logits = torch.cat([head(vi[i : i + VAL_BATCH], vt[i : i + VAL_BATCH])
                                    for i in range(0, len(vy), VAL_BATCH)])
            val_loss = float(criterion(val_logits, vy))
        val_f1 = macro_f1(data.y["val"], val_logits.argmax(1).numpy())
        history.append(
            {"epoch": epoch, "train_loss": total / n, "val_loss": val_loss, "val_macro_f1": val_f1,
             **(balancer.epoch_summary() if balancer is not None else {})}
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


# ---------------------------------------------------------------- the stage


def train_all(validated_path, image_features_path, text_features_path, cfg: TrainConfig, out_dir,
              encoders: EncodersConfig | None = None, cache_dir=None) -> TrainResult:
    """Train every head in ``cfg.heads`` and write their weights, metadata and predictions under ``out_dir``.

    The fine-tuned head (``finetune_xattn``, when ``cfg.finetune.enabled``) trains last, from the raw images and
    texts of ``validated_path`` with the encoders named in ``encoders`` (defaults when None); its checkpoints go
    under ``cache_dir`` (see ``crossmodal.finetune``).
    """
    import shutil

    from crossmodal.config import FINETUNED_HEADS, HEAD_NAMES, TRADITIONAL_HEADS
    from crossmodal.train_heads import train_frozen_heads

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
    frozen = [h for h in heads if h not in TRADITIONAL_HEADS and h not in FINETUNED_HEADS]
    if frozen:  # on every core at once where it pays (train.workers): see crossmodal.train_heads
        summaries, result.workers = train_frozen_heads(
            frozen, data, labels, cfg, out_dir, (validated_path, image_features_path, text_features_path))
        for name, summary in summaries.items():
            result.head_dirs[name] = summary["dir"]
            result.val_macro_f1[name] = summary["val_macro_f1"]
            result.best_epoch[name], result.epochs_run[name] = summary["best_epoch"], summary["epochs_run"]
            result.seconds[name] = summary["seconds"]
    for name in heads:
        if name in FINETUNED_HEADS:
            from crossmodal.finetune import finetune_head

            info = finetune_head(validated_path, cfg, encoders or EncodersConfig(), out_dir, cache_dir=cache_dir)
            result.head_dirs[name] = str(out_dir / name)
            result.val_macro_f1[name] = info["val_metrics"]["macro_f1"]
            result.best_epoch[name], result.epochs_run[name] = info["best_epoch"], info["epochs_run"]
            result.seconds[name] = info["train_seconds"]
    traditional = [h for h in cfg.heads if h in TRADITIONAL_HEADS]
    if traditional:
        from crossmodal.traditional import train_traditional

        for name, info in train_traditional(validated_path, data, labels, cfg, out_dir, traditional).items():
            result.head_dirs[name] = str(out_dir / name)
            result.val_macro_f1[name] = info["val_metrics"]["macro_f1"]
            result.best_epoch[name] = info["best_epoch"]
            result.epochs_run[name] = info["epochs_run"]
            result.seconds[name] = info["train_seconds"]
    return result
