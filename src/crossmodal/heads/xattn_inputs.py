"""Rows in, tensors and probabilities out, for the fine-tuned cross-attention model (``crossmodal.heads.xattn``).

    from crossmodal.heads.xattn_inputs import prepare_inputs, predict_proba
    inputs = prepare_inputs(images, texts, tokenizer, image_size=96, max_length=64)   # decoded once, reused
    proba = predict_proba(model, inputs)                                           # (N, C) float32

Images and texts go through the same functions as the frozen-feature pipeline (``crossmodal.data.images``,
``crossmodal.data.text``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from crossmodal.data.manifest import is_absent
from crossmodal.errors import FinetuneError
from crossmodal.hardware import autocast


@dataclass
class Inputs:
    """Model inputs for a set of rows, prepared once: uint8 pixels, token ids, masks, absent-modality flags."""

    pixels: torch.Tensor  # (N, 3, S, S) uint8
    input_ids: torch.Tensor  # (N, L) int64
    attention_mask: torch.Tensor  # (N, L) int64
    image_missing: torch.Tensor  # (N,) bool
    text_missing: torch.Tensor  # (N,) bool
    image_prefix: torch.Tensor | None = None  # frozen layers' outputs, when cached (FinetunedXattn.cache_frozen)
    text_prefix: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.pixels)

    def batch(self, idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
        mask = self.attention_mask[idx]
        length = max(1, int(mask.sum(1).max())) if len(idx) else 1  # trim padding shared by the whole batch
        out = {"pixels": self.pixels[idx].to(device), "input_ids": self.input_ids[idx, :length].to(device),
               "attention_mask": mask[:, :length].to(device), "image_missing": self.image_missing[idx].to(device),
               "text_missing": self.text_missing[idx].to(device)}
        if self.image_prefix is not None:
            out["image_prefix"] = self.image_prefix[idx].to(device)
        if self.text_prefix is not None:
            # Real tokens never attend to padding, so their states do not depend on how far a row was padded.
            out["text_prefix"] = self.text_prefix[idx, :length].to(device)
        return out


def prepare_inputs(images: list, texts: list, tokenizer, image_size: int, max_length: int,
                   max_pixels: int | None = None, names: list[str] | None = None) -> Inputs:
    """Decode and tokenise with the same functions as the frozen pipeline (``crossmodal.data.images``).

    An image or text that is None/NaN/empty is absent: its row gets the placeholder. A present image that does
    not decode raises :class:`crossmodal.data.images.ImageError` naming the row.
    """
    from crossmodal.data.images import ImageError, image_to_tensor, load_image
    from crossmodal.data.text import clean_text

    n = len(images)
    if len(texts) != n:
        raise FinetuneError(f"{n} images but {len(texts)} texts; give one of each per row (None when absent)")
    pixels = torch.zeros((n, 3, image_size, image_size), dtype=torch.uint8)
    image_missing = torch.zeros(n, dtype=torch.bool)
    for i, src in enumerate(images):
        if is_absent(src):
            image_missing[i] = True
            continue
        try:
            pixels[i] = image_to_tensor(load_image(bytes(src) if isinstance(src, bytearray) else src, max_pixels),
                                        image_size)
        except ImageError as err:
            what = names[i] if names else f"row {i}"
            raise ImageError(f"{what}: {err}") from None
    cleaned = ["" if is_absent(t) else clean_text(t).encode("utf-8", "replace").decode("utf-8") for t in texts]
    text_missing = torch.tensor([not t for t in cleaned], dtype=torch.bool)
    enc = tokenizer(cleaned, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return Inputs(pixels, enc["input_ids"].long(), enc["attention_mask"].long(), image_missing, text_missing)


def predict_proba(model: torch.nn.Module, inputs: Inputs, batch_size: int = 64, dtype: torch.dtype | None = None,
                  drop: str | None = None) -> np.ndarray:
    """Softmax probabilities (N, C) float32 in eval mode; ``drop`` = "image" or "text" removes that modality."""
    device = next(model.head.parameters()).device
    model.eval()
    out = []
    with torch.inference_mode():
        for idx in torch.arange(len(inputs)).split(batch_size):
            b = inputs.batch(idx, device)
            if drop == "image":
                b["image_missing"] = torch.ones_like(b["image_missing"])
            elif drop == "text":
                b["text_missing"] = torch.ones_like(b["text_missing"])
            with autocast(device, dtype):
                logits = model(**b)
            out.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
    if not out:
        return np.zeros((0, model.init_args["num_classes"]), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)

