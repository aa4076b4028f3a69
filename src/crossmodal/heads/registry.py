"""Fusion heads over frozen pooled features, one registry by name.

    from crossmodal.heads.registry import build_head, fit_standardizers
    head = build_head("gated", image_dim=1280, text_dim=384, num_classes=3, cfg=train_cfg)
    fit_standardizers(head, image_train, text_train)   # before training
    logits = head(image, text)                         # (N, C)
    same = build_head(**head.init_args)                # re-creation for loading

Every head is a plain ``nn.Module`` with ``forward(image, text) -> logits``, a class
attribute ``modality`` ("image", "text" or "fusion") and ``init_args``. An all-NaN feature
row means that modality is absent: heads swap in a learned placeholder
(``heads.common.fill_missing``). Heads with ``has_gates = True`` also answer
``forward(image, text, return_gates=True) -> (logits, gates)``, gates (N, 2) = [image, text]. A new head is
one file plus one line in ``HEADS`` (and its name in ``config.HEAD_NAMES``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from crossmodal.config import HEAD_NAMES
from crossmodal.heads.add import AddHead
from crossmodal.heads.attention import AttentionHead
from crossmodal.heads.averaged import AveragedHead
from crossmodal.heads.common import Standardize, feature_statistics
from crossmodal.heads.concat import ConcatHead
from crossmodal.heads.gated import GatedHead
from crossmodal.heads.late import LateFusionHead
from crossmodal.heads.linear import LinearProbeHead
from crossmodal.heads.stacking import StackingHead
from crossmodal.heads.unimodal import ImageOnlyHead, TextOnlyHead

if TYPE_CHECKING:
    from crossmodal.config import TrainConfig

HEADS: dict[str, type[nn.Module]] = {
    "image_only": ImageOnlyHead,
    "text_only": TextOnlyHead,
    "concat": ConcatHead,
    "gated": GatedHead,
    "add": AddHead,
    "late": LateFusionHead,
    "attention": AttentionHead,
    "stacking": StackingHead,
    "linear_probe": LinearProbeHead,
}
# Not in HEADS: "ensemble" is an AveragedHead of other heads, rebuilt from its members' init_args (build_head).
# Nor "cnn_rnn" (crossmodal.heads.cnn_rnn): it reads word pieces, not the frozen text features these heads take.
# Every nn.Module head is a named head; the traditional baselines (crossmodal.training.traditional) are not nn.Modules.
assert set(HEADS) <= set(HEAD_NAMES), "every HEADS entry must be named in config.HEAD_NAMES"


def build_head(
    name: str,
    image_dim: int,
    text_dim: int,
    num_classes: int,
    cfg: TrainConfig | None = None,
    *,
    hidden_dim: int | None = None,
    dropout: float | None = None,
    **extra,
) -> nn.Module:
    """Create head ``name``; sizes from ``cfg`` (or the explicit keywords, which win, as in ``init_args``).

    ``extra`` holds a head's own arguments beyond the shared ones (e.g. stacking's ``meta``). Averaged heads
    (``crossmodal.heads.averaged``): ``seeds=K`` rebuilds K copies of head ``name`` bagged with equal weights;
    ``name="ensemble"`` with ``members`` (their init_args), ``weights`` and optionally ``temperatures`` and
    ``pooling`` rebuilds an ensemble.
    """
    if name == "ensemble":
        members = [build_head(**args) for args in extra["members"]]
        # Ensembles saved before member temperatures and pooling were recorded are mean-pooled at T = 1.
        temperatures = [float(t) for t in extra.get("temperatures") or [1.0] * len(members)]
        pooling = extra.get("pooling", "mean")
        return AveragedHead(members, list(extra["weights"]), {
            "name": name, "image_dim": int(image_dim), "text_dim": int(text_dim), "num_classes": int(num_classes),
            "hidden_dim": int(hidden_dim or 0), "dropout": float(dropout or 0.0),
            "members": list(extra["members"]), "weights": [float(w) for w in extra["weights"]],
            "temperatures": temperatures, "pooling": pooling}, temperatures, pooling)
    seeds = int(extra.pop("seeds", 1))
    if seeds > 1:
        members = [build_head(name, image_dim, text_dim, num_classes, cfg, hidden_dim=hidden_dim, dropout=dropout,
                              **extra) for _ in range(seeds)]
        return AveragedHead.seed_bag(members)
    if name not in HEADS:
        raise ValueError(f"unknown fusion head {name!r}; choose from {list(HEADS)} (traditional_* heads are "
                         "scikit-learn baselines: see crossmodal.training.traditional)")
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got num_classes={num_classes}")
    if image_dim < 1 or text_dim < 1:
        raise ValueError(f"feature sizes must be positive, got image_dim={image_dim}, text_dim={text_dim}")
    if hidden_dim is None:
        hidden_dim = cfg.hidden_dim if cfg is not None else 256
    if dropout is None:
        dropout = cfg.dropout if cfg is not None else 0.2
    return HEADS[name](image_dim, text_dim, num_classes, hidden_dim=hidden_dim, dropout=dropout, **extra)


def ensemble_of(heads: list[nn.Module], weights: list[float], temperatures: list[float] | None = None,
                pooling: str = "mean") -> nn.Module:
    """The ``ensemble`` head pooling trained heads on the frozen features with ``weights``, each at its temperature
    (``crossmodal.heads.averaged``), their trained state copied in (what :func:`build_head` rebuilds from the saved
    init_args); in eval mode."""
    first = heads[0].init_args
    head = build_head("ensemble", first["image_dim"], first["text_dim"], first["num_classes"], hidden_dim=0,
                      dropout=0.0, members=[h.init_args for h in heads], weights=list(weights),
                      temperatures=temperatures, pooling=pooling)
    head.load_state_dict({f"members.{i}.{k}": v for i, h in enumerate(heads) for k, v in h.state_dict().items()}
                         | {"log_weights": head.log_weights}, strict=True)
    return head.eval()


def fit_standardizers(head: nn.Module, image_train: np.ndarray, text_train: np.ndarray,
                      statistics: dict | None = None) -> nn.Module:
    """Fit the head's per-modality :class:`Standardize` buffers on the training features (all-NaN rows, i.e.
    absent modalities, ignored) and start each missing-modality placeholder at the training mean.

    ``statistics``, when given, is a cache ``{"image": (mean, std), ...}`` of :func:`feature_statistics` results
    for these same features: a modality found there is not recomputed, one computed here is added (so the float64
    pass over a large training set is not repeated for every head)."""
    import torch

    for kind, features in (("image", image_train), ("text", text_train)):
        norm = getattr(head, f"{kind}_norm", None)
        if isinstance(norm, Standardize):
            if statistics is None:
                norm.fit(features)
            else:
                if kind not in statistics:
                    statistics[kind] = feature_statistics(features, norm.dim)
                norm.set_statistics(*statistics[kind])
            placeholder = getattr(head, f"{kind}_missing", None)
            if isinstance(placeholder, nn.Parameter):
                with torch.no_grad():  # standardises to zero: "an average row" until training moves it
                    placeholder.copy_(norm.mean)
    return head
