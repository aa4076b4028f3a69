"""Training losses for class imbalance: (class-weighted) cross-entropy and focal loss.

    from crossmodal.training.losses import make_criterion
    criterion = make_criterion(cfg.train, class_weight)     # class_weight: tensor (C,) or None
    loss = criterion(logits, y)

Focal loss (Lin et al., 2017) multiplies each example's cross-entropy by ``(1 - p_y) ** gamma``:
examples the model already gets right with confidence contribute little, so the rare or hard
classes drive the gradient. With ``gamma = 0`` it *is* cross-entropy, including the class-weighted
mean that ``nn.CrossEntropyLoss(weight=w)`` takes (sum of w_y * loss / sum of w_y), so switching
``train.loss`` changes one thing only. Metrics stay macro-averaged whatever the loss.
"""

from __future__ import annotations

import torch
from torch import nn

LOSSES = ("cross_entropy", "focal")


class FocalLoss(nn.Module):
    """``mean_w[(1 - p_y)^gamma * -log p_y]``, the mean weighted by ``weight[y]`` as in ``nn.CrossEntropyLoss``."""

    def __init__(self, gamma: float = 2.0, weight: torch.Tensor | None = None) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"focal loss needs gamma >= 0, got {gamma}")
        self.gamma = float(gamma)
        self.register_buffer("weight", weight if weight is None else weight.detach().clone().float())

    def forward(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        log_p = torch.log_softmax(logits, dim=1).gather(1, y.unsqueeze(1)).squeeze(1)
        # (1 - p)^0 must be exactly 1 (also where p == 1), so gamma 0 skips the factor altogether.
        focal = -log_p if self.gamma == 0 else -((1.0 - log_p.exp()).clamp(min=0.0) ** self.gamma) * log_p
        if self.weight is None:
            return focal.mean()
        w = self.weight[y]
        return (w * focal).sum() / w.sum().clamp(min=1e-12)


def make_criterion(cfg, class_weight: torch.Tensor | None = None) -> nn.Module:
    """The loss named by ``cfg.loss`` (a TrainConfig), with the class weights (or None)."""
    if cfg.loss == "cross_entropy":
        return nn.CrossEntropyLoss(weight=class_weight)
    if cfg.loss == "focal":
        return FocalLoss(cfg.focal_gamma, class_weight)
    raise ValueError(f"unknown loss {cfg.loss!r}; set train.loss to one of {list(LOSSES)}")
