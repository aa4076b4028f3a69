"""Gated fusion: a per-sample, learned weighting of the two modalities.

Both modalities are projected to ``hidden_dim``; a small gate network looks at both
projections and outputs two weights (softmax, so they sum to 1); the fused vector is
the weighted sum, classified by an MLP. The weights say, per sample, how much the
head leaned on the image versus the text, so they are kept for attribution:

    logits, gates = head(image, text, return_gates=True)   # gates (N, 2): [image, text]
    head.last_gates                                        # the same, from the last call
"""

from __future__ import annotations

import torch
from torch import nn

from crossmodal.heads.common import add_modality_inputs, base_init_args, fill_missing, mlp


class GatedHead(nn.Module):
    name = "gated"
    modality = "fusion"
    has_gates = True  # forward(..., return_gates=True) gives (logits, gates [image, text])

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.2):
        super().__init__()
        self.init_args = base_init_args(self.name, image_dim, text_dim, num_classes, hidden_dim, dropout)
        add_modality_inputs(self, image_dim, text_dim)
        # tanh, as in the Gated Multimodal Unit (Arevalo et al., 2017): bounded projections keep the
        # gate from amplifying one modality, which with ReLU makes the head overfit small data.
        self.image_proj = nn.Sequential(nn.Linear(image_dim, hidden_dim), nn.Tanh())
        self.text_proj = nn.Sequential(nn.Linear(text_dim, hidden_dim), nn.Tanh())
        gate_hidden = max(hidden_dim // 4, 8)  # the gate only decides a mix of two; keep it small
        self.gate = nn.Sequential(nn.Linear(2 * hidden_dim, gate_hidden), nn.ReLU(), nn.Linear(gate_hidden, 2))
        # Start from an even 50/50 mix, so neither modality is starved before the classifier
        # has learned whether it needs it.
        nn.init.zeros_(self.gate[-1].weight)
        nn.init.zeros_(self.gate[-1].bias)
        self.dropout = nn.Dropout(dropout)
        self.classifier = mlp(hidden_dim, hidden_dim, num_classes, dropout)
        self.last_gates: torch.Tensor | None = None  # (N, 2) [image, text] weights of the last forward

    def forward(self, image: torch.Tensor, text: torch.Tensor, return_gates: bool = False):
        image, text = fill_missing(image, self.image_missing), fill_missing(text, self.text_missing)
        zi = self.image_proj(self.image_norm(image))
        zt = self.text_proj(self.text_norm(text))
        gates = torch.softmax(self.gate(torch.cat([zi, zt], dim=1)), dim=1)
        fused = gates[:, 0:1] * zi + gates[:, 1:2] * zt
        logits = self.classifier(self.dropout(fused))
        self.last_gates = gates.detach()
        return (logits, gates) if return_gates else logits
