"""The training loop every frozen-feature head shares: mini-batches, loss, early stopping, the best epoch kept.

    from crossmodal.training.loop import train_head
    head, history = train_head("gated", data, cfg.train, num_classes=3)   # nn.Module in eval mode

Cross-entropy or focal loss (``train.loss``, optionally with balanced class weights), optional auxiliary unimodal
losses and OGM-GE gradient modulation (``crossmodal.training.modality``), mini-batches from a seeded generator,
validation after every epoch, early stopping on validation macro-F1 with ``train.patience``, and the best epoch's
weights restored at the end. With ``train.modality_dropout`` > 0 a training row's image or text is hidden (set to
NaN, the missing-modality marker) with that chance per step, never both. With one seed a run is reproducible to the
bit on the same machine.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np

from crossmodal.config import TrainConfig
from crossmodal.errors import TrainError
from crossmodal.training.dataset import SplitFeatures

OPTIMIZERS = ("adam", "adamw", "sgd", "rmsprop")
TRAIN_THREADS = 1  # see torch_threads()
# A training set larger than this is trained in "epochs" of this many rows (see BatchStream), with batches scaled up.
EPOCH_ROWS = 8_192
# Validation runs the head over the val rows in blocks of this many: the logits are the same to the bit as in one
# block (every row is computed on its own), and a block that stays in the CPU cache is faster.
VAL_BATCH = 1_024


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


class EarlyStopping:
    """The epoch to keep and when to stop, on validation macro-F1 (ties: lower loss; :func:`is_better`).

    Patience counts epochs without a macro-F1 gain; an equal F1 with a lower loss still becomes the kept state,
    but does not reset the count (a flat F1 must end training)."""

    def __init__(self, patience: int):
        self.patience = patience
        self.best_f1, self.best_loss, self.best_state, self.stale = -1.0, float("inf"), None, 0

    def update(self, f1: float, loss: float, module) -> bool:
        """Record an epoch's scores (a copy of ``module``'s state when it is the best); True when training stops."""
        self.stale = 0 if f1 > self.best_f1 + 1e-12 else self.stale + 1
        if is_better(f1, loss, self.best_f1, self.best_loss):
            self.best_f1, self.best_loss = f1, loss
            self.best_state = copy.deepcopy(module.state_dict())
        return self.stale >= self.patience


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


class BatchStream:
    """Shuffled mini-batch indices, one epoch at a time.

    Up to EPOCH_ROWS training rows, an epoch is one shuffled pass in batches of ``batch_size``, as usual.
    Beyond that, an epoch is EPOCH_ROWS rows taken from consecutive shuffled passes (every row is still seen
    once per pass), in batches of ``batch_size`` x (rows / EPOCH_ROWS) rounded down to a power of two, at most
    8x. Why: on a large train split a whole pass per validation makes early stopping wait ``patience`` whole
    passes after the best one, and small batches spend more time in per-step overhead than in arithmetic.
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

    Why 1 thread for training: the matrices here are tiny (a batch of 64), so threading gains
    little on an idle machine, and when anything else is running (an MLflow server, feature
    extraction) OpenMP threads wait on each other and an epoch becomes many times slower. One
    thread is also bit-reproducible whatever the core count; several cores are used by training
    several heads at once instead (``crossmodal.training.tasks``, one process each).
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def train_head(name: str, data: SplitFeatures, cfg: TrainConfig, num_classes: int,
               on_epoch: Callable[[dict], None] | None = None):
    """Train head ``name``; returns ``(head, history)`` with the best epoch's weights loaded, in eval mode.

    ``history`` has one dict per epoch run: epoch (1-based), train_loss, val_loss, val_macro_f1 (and, with
    auxiliary losses or OGM-GE on, score_image, score_text, ratio_image_text, coeff_*, aux_loss).
    The best epoch is the one with the highest val_macro_f1 (ties: lower val_loss); see :func:`best_epoch`.
    ``on_epoch`` gets each epoch's record as soon as it is known (``crossmodal.training.progress.epoch_writer``);
    an exception it raises (a pruned trial of ``crossmodal.training.tuning``) ends training and propagates as is.
    The head trains with its own settings, ``cfg.for_head(name)`` (``train.head_params``).
    """
    with torch_threads(TRAIN_THREADS):
        return _train_head(name, data, cfg.for_head(name), num_classes, on_epoch)


def _train_head(name: str, data: SplitFeatures, cfg: TrainConfig, num_classes: int,
                on_epoch: Callable[[dict], None] | None = None):
    import torch

    from crossmodal.heads.registry import build_head, fit_standardizers
    from crossmodal.training.losses import make_criterion
    from crossmodal.training.modality import ModalityBalancer

    for split in ("train", "val"):
        if len(data.y[split]) == 0:
            raise TrainError(f"the {split} split has no rows; training needs train rows and val rows (early stopping)")

    torch.manual_seed(cfg.seed)  # per head: a head's result does not depend on which heads ran before it
    head = build_head(name, data.image_dim, data.text_dim, num_classes, cfg)
    fit_standardizers(head, data.image["train"], data.text["train"], statistics=data.statistics)

    def tensor(a, dtype=torch.float32):
        return torch.from_numpy(np.ascontiguousarray(a)).to(dtype)

    xi, xt, y = tensor(data.image["train"]), tensor(data.text["train"]), tensor(data.y["train"], torch.int64)
    views = frozen_views(data, cfg)  # (K + 1, n, D) per modality with train.augment.frozen, else None
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
    stopping = EarlyStopping(cfg.patience)
    for epoch in range(1, cfg.max_epochs + 1):
        head.train()
        total = 0.0
        seen_as = None if views is None else torch.randint(0, len(views[0]), (n,), generator=views[2])
        for idx in batches.epoch():
            optimizer.zero_grad(set_to_none=True)
            bi, bt, by = xi[idx], xt[idx], y[idx]
            if seen_as is not None:  # each row as one of its views this epoch (0: the row itself)
                bi, bt = views[0][seen_as[idx], idx], views[1][seen_as[idx], idx]
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
        if on_epoch is not None:
            on_epoch(history[-1])
        if not np.isfinite(total):
            raise TrainError(
                f"head {name!r}: training loss became {total} at epoch {epoch}; lower train.lr (now {cfg.lr})"
            )
        if stopping.update(val_f1, val_loss, head):
            break

    head.load_state_dict(stopping.best_state)
    if hasattr(head, "fit_on_validation"):
        head.fit_on_validation(vi, vt, data.y["val"])
    head.eval()
    return head, history


def frozen_views(data: SplitFeatures, cfg: TrainConfig):
    """``(image, text, generator)``: the training rows (view 0) stacked on their augmented views, float32
    (K + 1, n, D) each, and the generator the epochs draw a view per row from; None unless
    ``train.augment.frozen`` is on and ``data`` has the views (a stacking fold's subset has none: it trains on
    its rows). Its own stream, so batch order and modality dropout are those of a run without views."""
    import torch

    if not cfg.augment.for_frozen or not data.views:
        return None
    k = len(data.views["image"])
    if k != cfg.augment.views:
        raise TrainError(f"the features hold {k} augmented views per training row but train.augment.views is "
                         f"{cfg.augment.views}; run `crossmodal extract` again")
    image = np.concatenate([data.image["train"][None], data.views["image"]])
    text = np.concatenate([data.text["train"][None], data.views["text"]])
    return torch.from_numpy(image), torch.from_numpy(text), torch.Generator().manual_seed(cfg.seed + 2)


def best_epoch(history: list[dict]) -> int:
    """The epoch whose weights :func:`train_head` kept (same rule as the loop)."""
    best, best_f1, best_loss = 0, -1.0, float("inf")
    for h in history:
        if is_better(h["val_macro_f1"], h["val_loss"], best_f1, best_loss):
            best, best_f1, best_loss = h["epoch"], h["val_macro_f1"], h["val_loss"]
    return best
