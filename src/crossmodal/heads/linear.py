"""The linear probe: one linear layer on both modalities' standardised, concatenated frozen features.

It is the yardstick of every fusion head: whatever a deep head adds over a logistic regression on the same
features is what its depth buys. Its weights are fitted by ``crossmodal.training.linear_probe`` (scikit-learn's
logistic regression, C picked on validation) and copied into this module, so it is saved, loaded, ensembled and
served like any head. An absent modality (all-NaN row) is replaced by the training mean, which standardises to 0:
that block then adds nothing to the logits.
"""

from __future__ import annotations

import torch
from torch import nn

from crossmodal.heads.common import Standardize, base_init_args, fill_missing


class LinearProbeHead(nn.Module):
    name = "linear_probe"
    modality = "fusion"

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, hidden_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        # hidden_dim and dropout are unused (there is no hidden layer); they stay in init_args like every head's.
        self.init_args = base_init_args(self.name, image_dim, text_dim, num_classes, hidden_dim, dropout)
        self.image_norm, self.text_norm = Standardize(image_dim), Standardize(text_dim)
        self.classifier = nn.Linear(image_dim + text_dim, num_classes)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image, text = fill_missing(image, self.image_norm.mean), fill_missing(text, self.text_norm.mean)
        return self.classifier(torch.cat([self.image_norm(image), self.text_norm(text)], dim=1))
