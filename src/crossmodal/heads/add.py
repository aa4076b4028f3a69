"""Element-wise additive fusion: project both modalities into one space and add them.

Unlike concatenation the two projections must agree on a shared space, which acts as
a mild regulariser; the nonlinearity after the sum is what lets the classifier model
interactions between the modalities.
"""

from __future__ import annotations

import torch
from torch import nn

from crossmodal.heads.common import add_modality_inputs, base_init_args, fill_missing, mlp


class AddHead(nn.Module):
    name = "add"
    modality = "fusion"

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.2):
        super().__init__()
        self.init_args = base_init_args(self.name, image_dim, text_dim, num_classes, hidden_dim, dropout)
        add_modality_inputs(self, image_dim, text_dim)
        self.image_proj = nn.Linear(image_dim, hidden_dim)
        self.text_proj = nn.Linear(text_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = mlp(hidden_dim, hidden_dim, num_classes, dropout)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image, text = fill_missing(image, self.image_missing), fill_missing(text, self.text_missing)
        fused = self.image_proj(self.image_norm(image)) + self.text_proj(self.text_norm(text))
        return self.classifier(self.dropout(torch.relu(fused)))
