"""Fitting stacking late fusion: the unimodal heads' out-of-fold probabilities, then the meta-classifier.

    from crossmodal.training.stacking import train_stacking
    head, history = train_stacking(data, cfg.train, num_classes)   # data: crossmodal.training.dataset.SplitFeatures
    logits = head(image, text)

Where ``late`` learns one weight, stacking learns per class how to combine ``image_only`` and ``text_only``. The
meta-classifier must see probabilities like those it gets at prediction time, from classifiers that did not train
on the row, so it is fitted on out-of-fold probabilities: the train split is cut into ``train.stacking.folds``
stratified folds, each fold is predicted by the two unimodal heads trained on the other folds, and the meta layer
(``logistic`` or ``mlp``) is fitted on [p_image | p_text] with the training loss. At prediction time the two
unimodal heads trained on the whole train split supply the probabilities.

On a large train split only the fewest whole folds holding ``train.stacking.oof_rows`` rows are predicted
(:func:`folds_to_predict`); each of those fold models is the one the full K-fold trains, so nothing leaks, and only
the meta-classifier (a few dozen weights) sees fewer rows. The folds are independent tasks that ``train_all``
runs in parallel with the other heads (``crossmodal.training.tasks``). The result is one ``nn.Module`` holding
both unimodal heads and the meta layer, saved and loaded like any head (``crossmodal.heads.files``).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from crossmodal.errors import TrainError
from crossmodal.heads.inference import predict_proba
from crossmodal.heads.registry import build_head
from crossmodal.heads.stacking import UNIMODAL
from crossmodal.training.dataset import SplitFeatures
from crossmodal.training.loop import TRAIN_THREADS, balanced_class_weights, macro_f1, torch_threads, train_head
from crossmodal.training.losses import make_criterion

META_L2 = 1e-3  # ridge penalty of the meta-classifier: a handful of weights fitted on a few hundred rows
META_MAX_ITER = 200


def fold_assignment(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """Fold index (0..folds-1) per row, stratified: each class is shuffled and dealt round-robin.

    The deal continues across classes, so fold sizes differ by at most one row.
    """
    y = np.asarray(y, dtype=np.int64)
    if len(y) < folds:
        raise ValueError(f"stacking needs at least {folds} train rows for {folds} folds, got {len(y)}; "
                         "lower train.stacking.folds")
    rng = np.random.default_rng(seed)
    out = np.empty(len(y), dtype=np.int64)
    start = 0
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        out[rows] = (start + np.arange(len(rows))) % folds
        start = (start + len(rows)) % folds
    return out


def folds_to_predict(n_train: int, folds: int, oof_rows: int | None) -> int:
    """How many of the ``folds`` folds get out-of-fold predictions (folds 0 .. m-1): all of them up to ``oof_rows``
    train rows (``train.stacking.oof_rows``; None: always all), else the fewest that hold that many rows."""
    if oof_rows is None or n_train <= oof_rows:
        return folds
    return max(1, min(folds, math.ceil(oof_rows * folds / n_train)))


def fold_split(data, fold: np.ndarray, k: int):
    """The data a fold-``k`` model sees: train = every other fold, val = the validation split, test = fold ``k``."""
    held = fold == k
    return SplitFeatures(
        image={"train": data.image["train"][~held], "val": data.image["val"], "test": data.image["train"][held]},
        text={"train": data.text["train"][~held], "val": data.text["val"], "test": data.text["train"][held]},
        y={"train": data.y["train"][~held], "val": data.y["val"], "test": data.y["train"][held]},
        ids={"train": data.ids["train"][~held], "val": data.ids["val"], "test": data.ids["train"][held]},
    )


def fold_probabilities(data, cfg, num_classes: int, k: int, name: str) -> np.ndarray:
    """Train base head ``name`` without fold ``k`` of the train split; its probabilities (n_k, C) for fold ``k``'s
    rows, in train-split order. One task of :func:`out_of_fold_probabilities`, runnable on its own (any process)."""
    part = fold_split(data, fold_assignment(data.y["train"], cfg.stacking.folds, cfg.seed), k)
    head, _ = train_head(name, part, cfg, num_classes)
    with torch_threads(TRAIN_THREADS):
        return predict_proba(head, part.image["test"], part.text["test"])


def out_of_fold_probabilities(data, cfg, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(N_train, 2C) [p_image | p_text] for train rows from heads that never saw them; and the fold per row.

    Rows of the folds not predicted (a large train split, see :func:`folds_to_predict`) are NaN.
    """
    fold = fold_assignment(data.y["train"], cfg.stacking.folds, cfg.seed)
    oof = np.full((len(fold), 2 * num_classes), np.nan, dtype=np.float32)
    for k in range(folds_to_predict(len(fold), cfg.stacking.folds, cfg.stacking.oof_rows)):
        for column, name in enumerate(UNIMODAL):
            oof[fold == k, column * num_classes : (column + 1) * num_classes] = fold_probabilities(
                data, cfg, num_classes, k, name)
    return oof, fold


def fit_meta(meta: nn.Module, features: np.ndarray, y: np.ndarray, criterion: nn.Module, seed: int) -> float:
    """Fit the meta layer by full-batch L-BFGS on ``criterion`` + a small ridge penalty; returns the final loss."""
    torch.manual_seed(seed)
    for layer in meta:
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    t = torch.from_numpy(np.asarray(y, dtype=np.int64))
    weights = [p for n, p in meta.named_parameters() if n.endswith("weight")]
    optimizer = torch.optim.LBFGS(meta.parameters(), lr=1.0, max_iter=META_MAX_ITER, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad(set_to_none=True)
        loss = criterion(meta(x), t) + META_L2 * sum((w**2).sum() for w in weights)
        loss.backward()
        return loss

    meta.train()
    optimizer.step(closure)
    meta.eval()
    with torch.no_grad():
        return float(criterion(meta(x), t))


def train_stacking(data, cfg, num_classes: int, base_heads: dict | None = None, oof: np.ndarray | None = None):
    """Train the stacking head; returns ``(head, history)`` like ``train_head`` (one history row).

    ``base_heads`` may hold ``image_only`` / ``text_only`` (modules or their state dicts) already trained on the
    same data and settings (``train_all`` passes them), which saves training them again; they are bit-identical
    either way. ``oof`` may hold the result of :func:`out_of_fold_probabilities` computed elsewhere (``train_all``
    computes its folds as parallel tasks); rows left NaN there are not used.
    """

    for split in ("train", "val"):
        if len(data.y[split]) == 0:
            raise TrainError(f"the {split} split has no rows; stacking needs train rows and val rows")
    if oof is None:
        try:
            oof, _ = out_of_fold_probabilities(data, cfg, num_classes)
        except ValueError as err:
            raise TrainError(str(err)) from None
    used = ~np.isnan(oof).any(axis=1)
    oof, y_oof = oof[used], data.y["train"][used]
    # Its base models are image_only and text_only trained with their own settings (train.head_params), whose
    # hidden size config.TrainConfig keeps equal: the head is built to hold them.
    head = build_head("stacking", data.image_dim, data.text_dim, num_classes, cfg,
                      hidden_dim=cfg.for_head("image_only").hidden_dim, meta=cfg.stacking.meta,
                      meta_hidden=cfg.stacking.mlp_hidden)
    base_heads = base_heads or {}
    for attr, name in (("image_head", "image_only"), ("text_head", "text_only")):
        trained = base_heads.get(name)
        if trained is None:
            trained, _ = train_head(name, data, cfg, num_classes)
        getattr(head, attr).load_state_dict(trained if isinstance(trained, dict) else trained.state_dict())

    weight = None
    if cfg.class_weights:
        weight = torch.from_numpy(balanced_class_weights(data.y["train"], num_classes))
    criterion = make_criterion(cfg, weight)
    with torch_threads(TRAIN_THREADS):
        train_loss = fit_meta(head.meta, oof, y_oof, criterion, cfg.seed)
        head.eval()
        with torch.no_grad():
            val_logits = head(torch.from_numpy(data.image["val"]), torch.from_numpy(data.text["val"]))
            val_loss = float(criterion(val_logits, torch.from_numpy(data.y["val"])))
    oof_f1 = {m: macro_f1(y_oof, oof[:, k * num_classes : (k + 1) * num_classes].argmax(1))
              for k, m in enumerate(("image", "text"))}
    history = [{"epoch": 1, "train_loss": train_loss, "val_loss": val_loss,
                "val_macro_f1": macro_f1(data.y["val"], val_logits.argmax(1).numpy()),
                "oof_macro_f1_image": oof_f1["image"], "oof_macro_f1_text": oof_f1["text"],
                "oof_rows": int(used.sum())}]
    return head, history
