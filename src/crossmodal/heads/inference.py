"""Predicting with a trained frozen-feature head: probabilities, gate weights, a modality removed.

    from crossmodal.heads.inference import predict_proba, without
    proba = predict_proba(head, image, text)               # (N, C) float32
    no_text = predict_proba(head, image, without(text))    # the same rows with the text absent
"""

from __future__ import annotations

import numpy as np


def predict_proba(head, image: np.ndarray, text: np.ndarray, batch_size: int = 4096) -> np.ndarray:
    """Softmax probabilities (N, C) float32 in eval mode, batched to bound memory."""
    import torch

    head.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(image), batch_size):
            xi = torch.from_numpy(np.ascontiguousarray(image[i : i + batch_size], dtype=np.float32))
            xt = torch.from_numpy(np.ascontiguousarray(text[i : i + batch_size], dtype=np.float32))
            out.append(torch.softmax(head(xi, xt), dim=1).numpy())
    if not out:
        n_classes = head.init_args["num_classes"]
        return np.zeros((0, n_classes), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


def without(features: np.ndarray) -> np.ndarray:
    """The same rows with the modality absent (all NaN)."""
    return np.full_like(features, np.nan, dtype=np.float32)


def predict_gates(head, image: np.ndarray, text: np.ndarray, batch_size: int = 4096) -> np.ndarray | None:
    """Per-row [image, text] gate weights (N, 2) float32 for heads with gates; None for the others."""
    import torch

    if not getattr(head, "has_gates", False):
        return None
    head.eval()
    out = [np.zeros((0, 2), dtype=np.float32)]
    with torch.no_grad():
        for i in range(0, len(image), batch_size):
            xi = torch.from_numpy(np.ascontiguousarray(image[i : i + batch_size], dtype=np.float32))
            xt = torch.from_numpy(np.ascontiguousarray(text[i : i + batch_size], dtype=np.float32))
            out.append(head(xi, xt, return_gates=True)[1].numpy())
    return np.concatenate(out).astype(np.float32)
