"""Late (decision-level) fusion: two unimodal classifiers whose probabilities are averaged.

Training: each classifier learns on its own modality; the loss is the sum of their
two cross-entropies (:meth:`LateFusionHead.loss`, which the training loop calls when a
head defines it). After training, the image weight ``w`` is fitted on the validation
split (:meth:`LateFusionHead.fit_on_validation`): a grid over [0, 1], highest macro-F1
wins, lower log-loss breaks ties. Prediction is

    p = w * softmax(image_logits) + (1 - w) * softmax(text_logits)

(a row missing one modality uses the other classifier alone, whatever ``w``), and
``forward`` returns ``log p`` so that ``softmax(forward(...)) == p`` and a plain
cross-entropy on the output is the log-loss of the averaged probabilities.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from crossmodal.heads.common import add_modality_inputs, base_init_args, fill_missing, mlp

WEIGHT_GRID = np.round(np.linspace(0.0, 1.0, 21), 2)  # steps of 0.05


class LateFusionHead(nn.Module):
    name = "late"
    modality = "fusion"
    decides_missing_alone = True  # a one-modality row uses that classifier alone: modality dropout is not needed

    def __init__(self, image_dim: int, text_dim: int, num_classes: int, hidden_dim: int = 256, dropout: float = 0.2):
        super().__init__()
        self.init_args = base_init_args(self.name, image_dim, text_dim, num_classes, hidden_dim, dropout)
        add_modality_inputs(self, image_dim, text_dim)
        self.image_classifier = mlp(image_dim, hidden_dim, num_classes, dropout)
        self.text_classifier = mlp(text_dim, hidden_dim, num_classes, dropout)
        # Weight of the image classifier's probabilities; a buffer so it is saved with the weights.
        self.register_buffer("image_weight", torch.tensor(0.5))

    def unimodal_logits(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, text = fill_missing(image, self.image_missing), fill_missing(text, self.text_missing)
        return self.image_classifier(self.image_norm(image)), self.text_classifier(self.text_norm(text))

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        li, lt = self.unimodal_logits(image, text)
        w = self.image_weight.clamp(0.0, 1.0)
        # A row missing one modality is decided by the other classifier alone (weight 1 on what is present).
        if bool(torch.isnan(image[:, :1]).any() or torch.isnan(text[:, :1]).any()):  # cheap: see fill_missing
            no_image, no_text = torch.isnan(image).all(dim=1, keepdim=True), torch.isnan(text).all(dim=1, keepdim=True)
            if bool(no_image.any() or no_text.any()):
                w = torch.where(no_text, 1.0, torch.where(no_image, 0.0, w)).to(li.dtype)
        # log(w * p_i + (1 - w) * p_t) in log space: stable, and exact at w = 0 or 1 (log 0 = -inf drops out).
        stacked = torch.stack([torch.log(w) + torch.log_softmax(li, 1), torch.log1p(-w) + torch.log_softmax(lt, 1)])
        return torch.logsumexp(stacked, dim=0)

    def loss(self, image: torch.Tensor, text: torch.Tensor, y: torch.Tensor, criterion: nn.Module) -> torch.Tensor:
        # Each classifier must stand on its own: averaging is only decided afterwards, on validation.
        li, lt = self.unimodal_logits(image, text)
        return criterion(li, y) + criterion(lt, y)

    @torch.no_grad()
    def fit_on_validation(self, image: torch.Tensor, text: torch.Tensor, y: torch.Tensor | np.ndarray) -> float:
        """Pick the image weight on validation data; returns it (also stored in ``image_weight``)."""
        from sklearn.metrics import f1_score

        was_training = self.training
        self.eval()
        li, lt = self.unimodal_logits(torch.as_tensor(image), torch.as_tensor(text))
        self.train(was_training)
        pi = torch.softmax(li, 1).double().numpy()
        pt = torch.softmax(lt, 1).double().numpy()
        y = np.asarray(y, dtype=np.int64)
        best = (-math.inf, math.inf, 0.5)  # (macro-F1, log-loss, w)
        for w in WEIGHT_GRID:
            p = w * pi + (1.0 - w) * pt
            f1 = f1_score(y, p.argmax(1), average="macro", zero_division=0)
            log_loss = float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, None)).mean())
            if f1 > best[0] + 1e-12 or (abs(f1 - best[0]) <= 1e-12 and log_loss < best[1]):
                best = (f1, log_loss, float(w))
        self.image_weight.fill_(best[2])
        return best[2]
