"""Feature-level (early) fusion: standardise each modality, concatenate, classify with an MLP.

The simplest fusion and often a strong one: the first layer sees both modalities at
once, so it can learn interactions (e.g. a label that depends on image AND text).
"""

from __future__ import annotations

import torch
from torch import nn

from crossmodal.heads.common import add_modality_inputs, base_init_args, fill_missing, mlp


class ConcatHead(nn.Module):
    name = "concat"
    modality = "fusion"

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.2):
        super().__init__()
        self.init_args = base_init_args(self.name, image_dim, text_dim, num_classes, hidden_dim, dropout)
        add_modality_inputs(self, image_dim, text_dim)
        self.classifier = mlp(image_dim + text_dim, hidden_dim, num_classes, dropout)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image, text = fill_missing(image, self.image_missing), fill_missing(text, self.text_missing)
        fused = torch.cat([self.image_norm(image), self.text_norm(text)], dim=1)
        return self.classifier(fused)
