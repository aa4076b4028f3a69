"""Unimodal baselines: an MLP on one modality's features, ignoring the other.

They exist to answer "does fusion help?": the evaluation reports the gain of the best
fusion head over the best of these two. Both take ``forward(image, text)`` like every
head, so the training loop and the served model treat all heads alike.
"""

from __future__ import annotations

import torch
from torch import nn

from crossmodal.heads.common import Standardize, base_init_args, fill_missing, missing_placeholder, mlp


class ImageOnlyHead(nn.Module):
    name = "image_only"
    modality = "image"

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.2):
        super().__init__()
        self.init_args = base_init_args(self.name, image_dim, text_dim, num_classes, hidden_dim, dropout)
        self.image_norm = Standardize(image_dim)
        self.image_missing = missing_placeholder(image_dim)
        self.classifier = mlp(image_dim, hidden_dim, num_classes, dropout)

    def forward(self, image: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.image_norm(fill_missing(image, self.image_missing)))


class TextOnlyHead(nn.Module):
    name = "text_only"
    modality = "text"

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.2):
        super().__init__()
        self.init_args = base_init_args(self.name, image_dim, text_dim, num_classes, hidden_dim, dropout)
        self.text_norm = Standardize(text_dim)
        self.text_missing = missing_placeholder(text_dim)
        self.classifier = mlp(text_dim, hidden_dim, num_classes, dropout)

    def forward(self, image: torch.Tensor | None, text: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.text_norm(fill_missing(text, self.text_missing)))
