"""Attention fusion: a small Transformer over one token per modality plus a CLS token.

Each modality's pooled features become a token of size ``model_dim`` tagged with a learned modality-type
embedding; two pre-norm Transformer encoder layers let the CLS, image and text tokens attend to each other, and
the classifier reads the CLS output. Three tokens train fast; the same head would take patch/word tokens unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from crossmodal.heads.common import add_modality_inputs, base_init_args, fill_missing

NUM_LAYERS = 2
NUM_HEADS = 4
MAX_MODEL_DIM = 64  # three tokens need little width: a wider model costs time without improving the head


def model_dim_for(hidden_dim: int) -> int:
    """Token size: hidden_dim capped at MAX_MODEL_DIM, rounded down to a multiple of the head count."""
    d = min(hidden_dim, MAX_MODEL_DIM)
    return max(NUM_HEADS * 2, d - d % NUM_HEADS)


class AttentionHead(nn.Module):
    name = "attention"
    modality = "fusion"

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.2):
        super().__init__()
        self.init_args = base_init_args(self.name, image_dim, text_dim, num_classes, hidden_dim, dropout)
        d = self.model_dim = model_dim_for(hidden_dim)
        add_modality_inputs(self, image_dim, text_dim)
        self.image_proj = nn.Linear(image_dim, d)
        self.text_proj = nn.Linear(text_dim, d)
        self.type_embed = nn.Parameter(torch.randn(2, d) * 0.02)  # row 0: image, row 1: text
        self.cls = nn.Parameter(torch.randn(1, 1, d) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model=d, nhead=NUM_HEADS, dim_feedforward=2 * d, dropout=dropout, batch_first=True, norm_first=True
        )
        # enable_nested_tensor only pays for padded sequences; ours are always 3 tokens.
        self.encoder = nn.TransformerEncoder(layer, num_layers=NUM_LAYERS, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.classifier = nn.Linear(d, num_classes)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        image, text = fill_missing(image, self.image_missing), fill_missing(text, self.text_missing)
        image_tok = self.image_proj(self.image_norm(image)) + self.type_embed[0]
        text_tok = self.text_proj(self.text_norm(text)) + self.type_embed[1]
        cls = self.cls.expand(image.shape[0], -1, -1)
        tokens = torch.cat([cls, image_tok.unsqueeze(1), text_tok.unsqueeze(1)], dim=1)  # (N, 3, d)
        out = self.encoder(tokens)
        return self.classifier(self.norm(out[:, 0]))
