"""Modality imbalance in fusion heads: auxiliary unimodal losses and OGM-GE gradient modulation.

A fusion head trained end to end often leans on the modality that is easiest to fit and leaves the
other under-trained ("modality imbalance", Peng et al., CVPR 2022). Two remedies, both set in params:

* ``train.aux_loss_weight``: add ``w * (loss(image-only logits) + loss(text-only logits))`` so the
  head must also classify from each modality alone.
* ``train.ogm_ge``: On-the-fly Gradient Modulation with Generalisation Enhancement. Per batch, the
  confidence score of each modality is ``s_m = sum_i softmax(unimodal logits_m)_i[y_i]``; the
  dominant modality (ratio ``rho = s_m / s_other > 1``) gets its encoder-side gradients multiplied by
  ``1 - tanh(alpha * (rho - 1))``, the other keeps coefficient 1; then Gaussian noise with each
  gradient's own standard deviation is added to both encoders' gradients (the "GE" part).

The unimodal logits of a head: late fusion has its two classifiers; any other fusion head is asked
with the other modality set to its training mean (the Standardize mean: "no information"), so
no head needs extra layers. "Encoder side" means the parameters that see one modality only:
``image_proj`` / ``text_proj`` (add, gated, attention), the two classifiers (late), or the first
layer's image / text columns (concat).

    balancer = ModalityBalancer.for_head(head, cfg)   # None: option off, or a unimodal head
    loss = criterion(head(xi, xt), y) + balancer.batch(xi, xt, y, criterion)
    loss.backward(); balancer.modulate(); optimizer.step()
    history_row.update(balancer.epoch_summary())      # per-epoch means of scores, ratio, coefficients
"""

from __future__ import annotations

import math

import torch
from torch import nn

# (parameter, column slice or None): the part of a parameter that only sees one modality.
ParamPart = tuple[nn.Parameter, slice | None]


def ogm_coefficients(score_image: float, score_text: float, alpha: float) -> tuple[float, float]:
    """(image, text) gradient coefficients: ``1 - tanh(alpha * (ratio - 1))`` for the dominant modality, 1 else."""
    if score_image <= 0 or score_text <= 0:
        return 1.0, 1.0
    ratio = score_image / score_text
    if ratio > 1:
        return 1.0 - math.tanh(alpha * (ratio - 1.0)), 1.0
    return 1.0, 1.0 - math.tanh(alpha * (1.0 / ratio - 1.0))


def unimodal_logits(head: nn.Module, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(image-only logits, text-only logits) of a fusion head; see the module docstring."""
    if hasattr(head, "unimodal_logits"):
        return head.unimodal_logits(image, text)
    neutral_text = head.text_norm.mean.expand_as(text)
    neutral_image = head.image_norm.mean.expand_as(image)
    return head(image, neutral_text), head(neutral_image, text)


def encoder_parameters(head: nn.Module) -> dict[str, list[ParamPart]] | None:
    """The parameters that see only the image / only the text, or None when the head has no such split."""
    if hasattr(head, "image_proj") and hasattr(head, "text_proj"):
        return {"image": [(p, None) for p in head.image_proj.parameters()],
                "text": [(p, None) for p in head.text_proj.parameters()]}
    if hasattr(head, "image_classifier") and hasattr(head, "text_classifier"):
        return {"image": [(p, None) for p in head.image_classifier.parameters()],
                "text": [(p, None) for p in head.text_classifier.parameters()]}
    first = getattr(head, "classifier", None)
    first = first[0] if isinstance(first, nn.Sequential) else None
    image_dim = head.init_args.get("image_dim") if hasattr(head, "init_args") else None
    if isinstance(first, nn.Linear) and image_dim and first.in_features == image_dim + head.init_args["text_dim"]:
        # concat: the first layer reads [image | text]; its weight's column blocks are the two encoders.
        return {"image": [(first.weight, slice(0, image_dim))], "text": [(first.weight, slice(image_dim, None))]}
    return None


class ModalityBalancer:
    """Per-batch auxiliary losses, confidence scores and OGM-GE modulation for one head's training."""

    def __init__(self, head: nn.Module, aux_weight: float, ogm: bool, alpha: float, noise: bool, seed: int = 0):
        self.head = head
        self.aux_weight = float(aux_weight)
        self.ogm, self.alpha, self.noise = ogm, float(alpha), noise
        self.params = encoder_parameters(head) if ogm else None
        if ogm and self.params is None:
            raise ValueError(f"head {head.init_args['name']!r} has no per-modality parameters to modulate")
        self.generator = torch.Generator().manual_seed(seed)  # GE noise: reproducible, off the global RNG
        self.coeffs = (1.0, 1.0)
        self._reset()

    @classmethod
    def for_head(cls, head: nn.Module, cfg) -> ModalityBalancer | None:
        """A balancer when ``cfg`` (TrainConfig) turns either remedy on and the head fuses two modalities."""
        if getattr(head, "modality", "fusion") != "fusion" or not hasattr(head, "image_norm"):
            return None
        # Late fusion already trains each classifier on its own loss: an auxiliary loss would only double it.
        aux = 0.0 if hasattr(head, "unimodal_logits") else cfg.aux_loss_weight
        ogm = cfg.ogm_ge.enabled and encoder_parameters(head) is not None
        if aux <= 0 and not ogm:
            return None
        return cls(head, aux, ogm, cfg.ogm_ge.alpha, cfg.ogm_ge.gaussian_noise, cfg.seed)

    def _reset(self) -> None:
        self._sums = {"score_image": 0.0, "score_text": 0.0, "ratio_image_text": 0.0, "coeff_image": 0.0,
                      "coeff_text": 0.0, "aux_loss": 0.0}
        self._rows = 0
        self._batches = 0

    def batch(self, image: torch.Tensor, text: torch.Tensor, y: torch.Tensor, criterion) -> torch.Tensor:
        """Record this batch's confidence scores, set the OGM coefficients; return the auxiliary loss (or 0)."""
        with torch.set_grad_enabled(self.aux_weight > 0 and torch.is_grad_enabled()):
            li, lt = unimodal_logits(self.head, image, text)
        with torch.no_grad():
            si = float(torch.softmax(li.detach(), 1).gather(1, y.unsqueeze(1)).sum())
            st = float(torch.softmax(lt.detach(), 1).gather(1, y.unsqueeze(1)).sum())
        self.coeffs = ogm_coefficients(si, st, self.alpha) if self.ogm else (1.0, 1.0)
        n = len(y)
        self._rows += n
        self._batches += 1
        self._sums["score_image"] += si
        self._sums["score_text"] += st
        self._sums["ratio_image_text"] += si / max(st, 1e-12)
        self._sums["coeff_image"] += self.coeffs[0]
        self._sums["coeff_text"] += self.coeffs[1]
        if self.aux_weight <= 0:
            return torch.zeros((), dtype=li.dtype)
        aux = self.aux_weight * (criterion(li, y) + criterion(lt, y))
        self._sums["aux_loss"] += float(aux.detach()) * n
        return aux

    @torch.no_grad()
    def modulate(self) -> None:
        """After ``backward``: scale each encoder's gradients by its coefficient, plus GE noise."""
        if not self.ogm:
            return
        for modality, k in zip(("image", "text"), self.coeffs, strict=True):
            for param, cols in self.params[modality]:
                if param.grad is None:
                    continue
                grad = param.grad if cols is None else param.grad[:, cols]
                scaled = grad * k
                if self.noise and grad.numel() > 1:
                    std = float(grad.std()) + 1e-8
                    scaled = scaled + torch.randn(grad.shape, generator=self.generator, dtype=grad.dtype) * std
                grad.copy_(scaled)  # a view for concat's column block, so this writes into param.grad

    def epoch_summary(self) -> dict[str, float]:
        """Per-epoch means (scores per row, ratio and coefficients per batch), then start the next epoch."""
        if not self._batches:
            return {}
        out = {"score_image": self._sums["score_image"] / self._rows,
               "score_text": self._sums["score_text"] / self._rows,
               "ratio_image_text": self._sums["ratio_image_text"] / self._batches}
        if self.ogm:
            out["coeff_image"] = self._sums["coeff_image"] / self._batches
            out["coeff_text"] = self._sums["coeff_text"] / self._batches
        if self.aux_weight > 0:
            out["aux_loss"] = self._sums["aux_loss"] / self._rows
        self._reset()
        return out
