"""Fusion heads over frozen pooled features, one registry by name.

    from crossmodal.fusion import build_head, fit_standardizers
    head = build_head("gated", image_dim=1280, text_dim=384, num_classes=3, cfg=train_cfg)
    fit_standardizers(head, image_train, text_train)   # before training
    logits = head(image, text)                         # (N, C)
    same = build_head(**head.init_args)                # re-creation for loading

Every head is a plain ``nn.Module`` with ``forward(image, text) -> logits``, a class
attribute ``modality`` ("image", "text" or "fusion") and ``init_args``. A new head is
one file plus one line in ``HEADS`` (and its name in ``config.HEAD_NAMES``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from torch import nn

from crossmodal.config import FINETUNED_HEADS, HEAD_NAMES
from crossmodal.fusion.add import AddHead
from crossmodal.fusion.attention import AttentionHead
from crossmodal.fusion.common import Standardize
from crossmodal.fusion.concat import ConcatHead
from crossmodal.fusion.gated import GatedHead
from crossmodal.fusion.late import LateFusionHead
from crossmodal.fusion.unimodal import ImageOnlyHead, TextOnlyHead

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
}
# Heads on frozen features; the fine-tuned ones (config.FINETUNED_HEADS) train from raw inputs (crossmodal.finetune).
assert tuple(HEADS) == tuple(h for h in HEAD_NAMES if h not in FINETUNED_HEADS), \
    "fusion.HEADS and config.HEAD_NAMES must list the same heads"

__all__ = ["HEADS", "Standardize", "build_head", "fit_standardizers"]


def build_head(
    name: str,
    image_dim: int,
    text_dim: int,
    num_classes: int,
    cfg: TrainConfig | None = None,
    *,
    hidden_dim: int | None = None,
    dropout: float | None = None,
) -> nn.Module:
    """Create head ``name``; sizes from ``cfg`` (or the explicit keywords, which win, as in ``init_args``)."""
    if name not in HEADS:
        raise ValueError(f"unknown fusion head {name!r}; choose from {list(HEADS)}")
    if num_classes < 2:
        raise ValueError(f"a classifier needs at least 2 classes, got num_classes={num_classes}")
    if image_dim < 1 or text_dim < 1:
        raise ValueError(f"feature sizes must be positive, got image_dim={image_dim}, text_dim={text_dim}")
    if hidden_dim is None:
        hidden_dim = cfg.hidden_dim if cfg is not None else 256
    if dropout is None:
        dropout = cfg.dropout if cfg is not None else 0.2
    return HEADS[name](image_dim, text_dim, num_classes, hidden_dim=hidden_dim, dropout=dropout)


def fit_standardizers(head: nn.Module, image_train: np.ndarray, text_train: np.ndarray) -> nn.Module:
    """Fit the head's per-modality :class:`Standardize` buffers on the training features."""
    for attr, features in (("image_norm", image_train), ("text_norm", text_train)):
        norm = getattr(head, attr, None)
        if isinstance(norm, Standardize):
            norm.fit(features)
    return head
