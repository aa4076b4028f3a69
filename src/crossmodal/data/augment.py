"""Augmented views of images and texts: pure functions, seeded per item and view, so view k of a row never changes.

    from crossmodal.config import AugmentConfig
    from crossmodal.data.augment import image_view, text_view, view_seed
    aug = AugmentConfig(views=2)
    x = image_view(img, 96, aug.image, view_seed(image_sha256, 1, aug.seed), view=1)   # uint8 (3, 96, 96)
    t = text_view("address book new", aug.text, view_seed(text_key("address book new"), 1, aug.seed), view=1)

View 0 is the item itself: ``image_view(..., view=0)`` is ``crossmodal.data.images.image_to_tensor`` to the pixel
and ``text_view(..., view=0)`` the text as given. A view k >= 1 is drawn from its own generator, seeded from the
item's content key, the view number and ``train.augment.seed`` (:func:`view_seed`): nothing here reads or moves
torch's global random state, so augmenting never changes what a training run draws elsewhere, threads may
augment at once, and identical images (or texts) get identical views, which is what lets the feature store and
fine-tuning's prefix cache address views by content.

Images (``train.augment.image``), with ``torchvision.transforms.v2.functional``: a random resized crop (the
parameters drawn as ``RandomResizedCrop(scale=crop_scale, ratio=(3/4, 4/3))`` draws them, bicubic with
antialiasing like the un-augmented resize), a horizontal flip with chance 1/2, and brightness, contrast and
saturation jitter in a random order (as ``ColorJitter``; hue is left alone, since colour may be what tells two
classes apart). Texts (``train.augment.text``), per word: token dropout (the word becomes the tokenizer's
unknown token), random deletion, and random swaps of adjacent words; at least one original word always survives,
so a non-empty text never becomes empty or all unknown tokens.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING

import numpy as np

from crossmodal.config import ImageAugmentConfig, TextAugmentConfig

if TYPE_CHECKING:  # torch is heavy; only the image functions need it
    import torch
    from PIL import Image

RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect-ratio range
CROP_TRIES = 10  # as RandomResizedCrop: then fall back to the whole image's centre
UNK = "[UNK]"  # BERT-family tokenizers' unknown token; pass the tokenizer's own ``unk_token`` where it differs


def view_seed(key: str | bytes, view: int, seed: int = 0) -> int:
    """The generator seed of view ``view`` of the item whose content key is ``key`` (an image's sha256, a text's)."""
    raw = key if isinstance(key, bytes) else str(key).encode("utf-8", "surrogatepass")
    h = hashlib.sha256(b"crossmodal-augment\x00" + int(seed).to_bytes(8, "little", signed=True)
                       + int(view).to_bytes(4, "little") + raw)
    return int.from_bytes(h.digest()[:8], "little")


def text_key(text: str) -> str:
    """The content key of a text for :func:`view_seed`: the sha256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


# --------------------------------------------------------------------------- images
def crop_box(height: int, width: int, scale: tuple[float, float], rng: np.random.Generator) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop covering a ``scale`` share of the area, aspect ratio in ``RATIO``."""
    area = height * width
    log_ratio = (math.log(RATIO[0]), math.log(RATIO[1]))
    for _ in range(CROP_TRIES):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    # Every draw fell outside the image (a very long strip): the largest centred crop within the ratio range.
    ratio = width / height
    if ratio < RATIO[0]:
        w, h = width, int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        h, w = height, int(round(height * RATIO[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def augment_pixels(x: torch.Tensor, size: int, cfg: ImageAugmentConfig, seed: int) -> torch.Tensor:
    """uint8 (3, H, W), the whole decoded image -> one augmented uint8 (3, size, size), drawn from ``seed``."""
    import torch
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    rng = np.random.default_rng(seed)
    top, left, h, w = crop_box(int(x.shape[-2]), int(x.shape[-1]), cfg.crop_scale, rng)
    # Crop, then resize the crop alone: the same pixels as F.resized_crop, at a third of its cost on uint8 input.
    out = F.resize(x[:, top : top + h, left : left + w], [size, size], interpolation=InterpolationMode.BICUBIC,
                   antialias=True)
    if cfg.flip and rng.random() < 0.5:
        out = F.horizontal_flip(out)
    j = cfg.color_jitter
    if j > 0:
        factors = rng.uniform(max(0.0, 1 - j), 1 + j, size=3)
        adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
        # In float, rounded once at the end (uint8 input would be converted and rounded by each adjustment).
        out = out.float().div_(255)
        for k in rng.permutation(3):
            out = adjust[k](out, float(factors[k]))
        out = out.mul_(255).round_().clamp_(0, 255)
    return out.to(torch.uint8).contiguous()


def image_view(img: Image.Image | torch.Tensor, size: int, cfg: ImageAugmentConfig, seed: int,
               view: int) -> torch.Tensor:
    """View ``view`` of a decoded image (RGB PIL image or uint8 (3, H, W)) as uint8 (3, size, size).

    View 0 is the un-augmented input, exactly ``image_to_tensor``; any other view is :func:`augment_pixels` with
    ``seed`` (from :func:`view_seed` of the image's content key and ``view``).
    """
    import torch

    from crossmodal.data.images import image_to_tensor, resize_crop

    if not isinstance(img, torch.Tensor):
        if view == 0:
            return image_to_tensor(img, size)
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
    if view == 0:
        return resize_crop(img.unsqueeze(0), size)[0].contiguous()
    return augment_pixels(img, size, cfg, seed)


# --------------------------------------------------------------------------- texts
def augment_text(text: str, cfg: TextAugmentConfig, seed: int, unk: str = UNK) -> str:
    """One augmented version of ``text`` (words split on whitespace), drawn from ``seed``.

    Each word is deleted with chance ``deletion``, else replaced by ``unk`` with chance ``token_dropout``; if no
    original word is left, one (chosen at random) comes back in its place. Then each adjacent pair is swapped with
    chance ``swap`` (left to right, a swapped word is not swapped again). An empty text stays empty.
    """
    words = text.split()
    n = len(words)
    if n == 0:
        return text
    rng = np.random.default_rng(seed)
    deleted = rng.random(n) < cfg.deletion
    dropped = ~deleted & (rng.random(n) < cfg.token_dropout)
    kept = ~deleted & ~dropped
    if not kept.any():  # never an empty text, nor one of unknown tokens only
        back = int(rng.integers(n))
        deleted[back] = dropped[back] = False
    out = [unk if dropped[i] else words[i] for i in range(n) if not deleted[i]]
    i = 0
    while i < len(out) - 1:
        if rng.random() < cfg.swap:
            out[i], out[i + 1] = out[i + 1], out[i]
            i += 2
        else:
            i += 1
    return " ".join(out)


def text_view(text: str, cfg: TextAugmentConfig, seed: int, view: int, unk: str = UNK) -> str:
    """View ``view`` of ``text``: the text itself for view 0, else :func:`augment_text` with ``seed``."""
    return text if view == 0 else augment_text(text, cfg, seed, unk)
