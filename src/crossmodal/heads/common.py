"""Pieces every fusion head shares: per-modality standardisation, absent-modality placeholders, a small MLP.

Frozen features differ wildly in scale between modalities, so each head owns one :class:`Standardize` per
modality it reads; its mean/std are buffers, saved with the weights, so the served model scales inputs exactly
as in training. An absent modality arrives as an all-NaN row, which :func:`fill_missing` replaces with the head's
learned placeholder (started at the training mean by ``fit_standardizers``; modality dropout teaches its use).

Usage::

    norm = Standardize(1280)
    norm.fit(train_features)                      # (N, 1280) array or tensor; all-NaN rows are ignored
    z = norm(batch)                               # (x - mean) / std
    x = fill_missing(batch, head.image_missing)   # all-NaN rows -> the placeholder
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class Standardize(nn.Module):
    """``(x - mean) / std`` with mean and std fitted on training features and stored as buffers."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        # Identity until fitted, so an unfitted head still runs (e.g. in shape tests).
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    @torch.no_grad()
    def fit(self, x: np.ndarray | torch.Tensor) -> Standardize:
        return self.set_statistics(*feature_statistics(x, self.dim))

    @torch.no_grad()
    def set_statistics(self, mean: torch.Tensor, std: torch.Tensor) -> Standardize:
        """Load a :func:`feature_statistics` result (what :meth:`fit` does with the one it computes)."""
        if mean.shape != (self.dim,) or std.shape != (self.dim,):
            raise ValueError(f"Standardize({self.dim}) got statistics of shape {tuple(mean.shape)}")
        self.mean.copy_(mean.to(self.mean.dtype))
        self.std.copy_(std.to(self.std.dtype))
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


@torch.no_grad()
def feature_statistics(x: np.ndarray | torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column (mean, std) in float64 over the rows that are not absent (no NaN), as :meth:`Standardize.fit`
    uses them; a constant column (std < 1e-6) gets std 1. Heads trained on the same features can share one
    result (training keeps one per training set and modality: ``crossmodal.training.dataset``)."""
    x = torch.as_tensor(np.asarray(x, dtype=np.float64) if not torch.is_tensor(x) else x, dtype=torch.float64)
    if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
        raise ValueError(f"Standardize expects features of shape (N, {dim}), got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("cannot fit Standardize on zero rows: the training split is empty")
    present = ~torch.isnan(x).any(dim=1)
    if not bool(present.all()):  # absent-modality rows say nothing about the scale (a copy only when there are some)
        x = x[present]
    if x.shape[0] == 0:
        raise ValueError("cannot fit Standardize: every training row lacks this modality (all-NaN features)")
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    # A constant feature (std 0) would blow up to +-inf on unseen data; leave it unscaled.
    return mean, torch.where(std < 1e-6, torch.ones_like(std), std)


def missing_placeholder(dim: int) -> nn.Parameter:
    """The learned stand-in for an absent modality's features (raw feature space, before Standardize)."""
    return nn.Parameter(torch.zeros(dim))


def fill_missing(x: torch.Tensor, placeholder: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` that are entirely NaN (modality absent) replaced by ``placeholder``; other rows unchanged."""
    if not bool(torch.isnan(x[:, :1]).any()):  # an all-NaN row has a NaN first column: a cheap test per batch
        return x
    missing = torch.isnan(x).all(dim=1, keepdim=True)
    if not bool(missing.any()):
        return x
    return torch.where(missing, placeholder.to(x.dtype).expand_as(x), x)


def add_modality_inputs(head: nn.Module, image_dim: int, text_dim: int) -> None:
    """What every head that reads both modalities has in front: per modality a Standardize layer
    (``image_norm`` / ``text_norm``) and a learned placeholder for an absent input (``image_missing`` /
    ``text_missing``, see :func:`fill_missing`)."""
    head.image_norm, head.text_norm = Standardize(image_dim), Standardize(text_dim)
    head.image_missing, head.text_missing = missing_placeholder(image_dim), missing_placeholder(text_dim)


def mlp(in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """One hidden layer: enough for frozen features, small enough to train quickly on a CPU."""
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, out_dim),
    )


def base_init_args(name: str, image_dim: int, text_dim: int, num_classes: int, hidden_dim: int, dropout: float) -> dict:
    """The JSON-able arguments that rebuild a head: ``build_head(**head.init_args)``."""
    return {
        "name": name,
        "image_dim": int(image_dim),
        "text_dim": int(text_dim),
        "num_classes": int(num_classes),
        "hidden_dim": int(hidden_dim),
        "dropout": float(dropout),
    }
