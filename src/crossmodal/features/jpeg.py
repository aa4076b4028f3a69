"""Batched JPEG decoding and resizing on a torch device: nvJPEG on CUDA, the same arithmetic as the CPU path.

On a GPU, Pillow decoding on the CPU is the bottleneck; batched nvJPEG decoding on the device removes it. Only
JPEGs that the CPU path would turn into the very same pixels take this route (three-channel RGB, complete, no EXIF
rotation, within the pixel limit); anything else, and any file the device decoder rejects, goes through
``crossmodal.data.images`` on the CPU, which also gives the user-facing error.

Usage::

    import torch
    from crossmodal.features.jpeg import gpu_ready_jpeg, decode_resize
    ok = gpu_ready_jpeg(data, max_pixels=None)      # plain RGB JPEG, upright, within the pixel limit?
    x = decode_resize([torch.frombuffer(bytearray(data), dtype=torch.uint8)], 224, "cuda")
    # uint8 (1, 3, 224, 224) on the device, as crossmodal.data.images.image_to_tensor(load_image(data), 224)
"""

from __future__ import annotations

import io
import warnings
from typing import TYPE_CHECKING

from crossmodal.data.images import resize_crop as cpu_resize_crop
from crossmodal.data.images import resized_shape

if TYPE_CHECKING:
    import torch

_SOI = b"\xff\xd8\xff"  # every JPEG starts with the start-of-image marker followed by another marker
_EOI = b"\xff\xd9"  # ... and ends with the end-of-image marker (a cut-off file does not)
_ORIENTATION = 0x0112


def gpu_ready_jpeg(data: bytes, max_pixels: int | None) -> bool:
    """True if ``data`` is a JPEG the device decoder turns into the same pixels as ``load_image``.

    Reads the header only (Pillow opens lazily), so this is cheap next to a decode.
    """
    if not data.startswith(_SOI) or not data.rstrip(b"\x00").endswith(_EOI):
        return False  # not a JPEG, or a truncated one (Pillow refuses those; let it say so)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode != "RGB":  # greyscale, CMYK: let Pillow convert them
                return False
            w, h = img.size
            limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
            if w == 0 or h == 0 or (limit is not None and w * h > limit):
                return False
            return img.getexif().get(_ORIENTATION, 1) in (1, None)  # rotated photos: load_image turns them
    except Exception:  # anything odd about the header: the CPU path decides and names the problem
        return False


def resize_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) of one shape -> uint8 (N, 3, size, size), as ``image_to_tensor`` does it.

    On the CPU that is ``crossmodal.data.images.resize_crop`` itself. On a GPU, where torch has no uint8
    antialiased bicubic, the same filter runs in float: two passes, horizontal then vertical, rounded to uint8 in
    between, as Pillow resamples 8-bit images (the clipping between the passes matters next to hard edges, where
    bicubic overshoots).
    """
    import torch
    import torch.nn.functional as F

    if x.device.type == "cpu":
        return cpu_resize_crop(x, size)
    h, w = x.shape[-2:]
    new_w, new_h = resized_shape(w, h, size)
    y = x.float()
    if new_w != w:
        y = F.interpolate(y, size=(h, new_w), mode="bicubic", antialias=True, align_corners=False)
        y = y.round_().clamp_(0, 255)
    if new_h != h:
        y = F.interpolate(y, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
        y = y.round_().clamp_(0, 255)
    x = y.to(torch.uint8)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return x[..., top : top + size, left : left + size]


def decode_resize(datas: list[torch.Tensor], size: int, device) -> torch.Tensor:
    """Decode JPEG byte tensors (1-D uint8, on the CPU, pinned ideally) on ``device``, resize and crop.

    Returns uint8 (N, 3, size, size) on ``device``. Raises RuntimeError if the decoder rejects any file
    (torchvision returns no partial results): the caller then retries image by image.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    device = torch.device(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its image decoders deprecated in favour of torchcodec
        images = decode_jpeg(datas, mode=ImageReadMode.RGB, device=device)
    out = torch.empty((len(images), 3, size, size), dtype=torch.uint8, device=device)
    # Photos from one source often share a size: resize each group of equal shapes as one batch.
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[-2:]), []).append(i)
    for idx in groups.values():
        out[idx] = resize_crop(torch.stack([images[i] for i in idx]), size)
    return out
