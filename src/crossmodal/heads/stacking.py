"""Stacking late fusion's network: a meta-classifier on the two unimodal heads' probabilities.

The weighted average of ``late`` learns one number; stacking learns how to combine the two unimodal classifiers
per class ("trust the text for class A, the image for class B"). The module holds both unimodal heads and the meta
layer, so it is saved, loaded and served like any head. Its fitting on out-of-fold probabilities is in
``crossmodal.training.stacking``.
"""

from __future__ import annotations

import torch
from torch import nn

from crossmodal.heads.common import base_init_args
from crossmodal.heads.unimodal import ImageOnlyHead, TextOnlyHead

META_KINDS = ("logistic", "mlp")
UNIMODAL = ("image_only", "text_only")  # the base heads, in the order of their columns in [p_image | p_text]


class StackingHead(nn.Module):
    name = "stacking"
    modality = "fusion"

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.2,
                 meta: str = "logistic", meta_hidden: int = 16):
        super().__init__()
        if meta not in META_KINDS:
            raise ValueError(f"unknown stacking meta-classifier {meta!r}; set train.stacking.meta to one of "
                             f"{list(META_KINDS)}")
        self.init_args = {**base_init_args(self.name, image_dim, text_dim, num_classes, hidden_dim, dropout),
                          "meta": meta, "meta_hidden": int(meta_hidden)}
        self.image_head = ImageOnlyHead(image_dim, text_dim, num_classes, hidden_dim, dropout)
        self.text_head = TextOnlyHead(image_dim, text_dim, num_classes, hidden_dim, dropout)
        features = 2 * num_classes
        if meta == "logistic":
            self.meta = nn.Sequential(nn.Linear(features, num_classes))
        else:
            self.meta = nn.Sequential(nn.Linear(features, meta_hidden), nn.ReLU(), nn.Linear(meta_hidden, num_classes))

    def base_probabilities(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """[p_image | p_text], (N, 2C): what the meta-classifier reads."""
        return torch.cat([torch.softmax(self.image_head(image, text), 1), torch.softmax(self.text_head(image, text), 1)],
                         dim=1)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.meta(self.base_probabilities(image, text))
