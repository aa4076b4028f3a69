"""Image loading and resizing shared by validation, feature extraction, fine-tuning and the served model.

    from crossmodal.data.images import load_image, image_to_tensor, ImageError
    img = load_image("photo.jpg", max_pixels=50_000_000)   # RGB PIL image, or ImageError
    x = image_to_tensor(img, 224)                          # uint8 tensor (3, 224, 224)

Training and serving call the same functions, so an image becomes model input identically in both places.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:  # torch is heavy; only image_to_tensor needs it
    import torch


class ImageError(ValueError):
    """An image could not be used; the message is a short reason fit for a quarantine table."""


# ISO base media "ftyp" brands of HEIF/HEIC files (iPhone photos). Pillow cannot decode them without a plugin
# that we do not ship, so they get their own reason instead of a generic "cannot identify image file".
_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs", b"mif1", b"msf1"}


def sniff_unsupported(head: bytes) -> str | None:
    """A reason when the first bytes of a file show a format we refuse (SVG, HEIC), else None."""
    if len(head) >= 12 and head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS:
        return "unsupported image format (heic): convert it to JPEG or PNG"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<?xml", b"<svg", b"<!doctype svg", b"<!--")) and b"<svg" in head.lower():
        return "unsupported image format (svg): vector images are not rasterised; convert it to PNG"
    return None


def _looks_like_text(head: bytes) -> str | None:
    """The start of ``head`` as a short string if it reads as text (UTF-8, printable), else None."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # a multi-byte character cut at the end of the sample is fine
            return None
        text = head[: err.start].decode("utf-8")
    if not text or "\x00" in text:
        return None
    printable = sum(ch.isprintable() or ch in "\t\r\n" for ch in text)
    return text if printable >= 0.95 * len(text) else None


def _open(source: str | Path | bytes) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError("file is empty")
        fp: io.BytesIO | Path = io.BytesIO(data)
        head = data[:512]
    else:
        fp = Path(source)
        if not fp.is_file():
            raise ImageError("file not found" if not fp.exists() else "not a file (a directory?)")
        if fp.stat().st_size == 0:
            raise ImageError("file is empty")
        with open(fp, "rb") as fh:
            head = fh.read(512)
    if reason := sniff_unsupported(head):
        raise ImageError(reason)
    try:
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS (and raises above twice that); load_image applies
            # its own limit to the declared size and raises ImageError, so the warning is only noise.
            # (catch_warnings is not thread-safe before Python 3.14; in threads the worst outcome is
            # that this one "ignore" filter outlives the call, which is harmless.)
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(fp)
    except Image.DecompressionBombError as err:
        # Pillow refuses sizes over twice its MAX_IMAGE_PIXELS before we can see them; report its numbers.
        nums = re.findall(r"\((\d+) pixels\)|limit of (\d+) pixels", str(err))
        declared = next((a for a, _ in nums if a), "too many")
        limit = next((b for _, b in nums if b), "of Pillow")
        raise ImageError(f"image has {declared} pixels, over the limit {limit}") from None
    except UnidentifiedImageError:
        if (text := _looks_like_text(head)) is not None:
            start = " ".join(text.split())[:40]
            raise ImageError(f"not a decodable image: the file holds text, not image data (it starts with "
                             f"{start!r}); check that the image column points at image files") from None
        raise ImageError("not a decodable image: unknown or unsupported format") from None
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"not a decodable image: {err}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16/32-bit greyscale: Pillow's convert("L") clips at 255, which turns most 16-bit
        # images white. Scale into 0..255 instead (16-bit range, or the maximum if larger).
        arr = np.asarray(img, dtype=np.float64)
        top = 255.0 if arr.size == 0 or arr.max() <= 255 else (65535.0 if arr.max() <= 65535 else float(arr.max()))
        arr = np.clip(arr * (255.0 / top), 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        # Transparent pixels often hold black RGB; compose over white as a viewer would show them.
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(source: str | Path | bytes, max_pixels: int | None = None) -> Image.Image:
    """Decode ``source`` (a path or the file's bytes) into an RGB image.

    EXIF orientation is applied; for animated or multi-page files the first frame is used.
    Raises :class:`ImageError` ("file not found", "file is empty", "not a decodable image: ...",
    "image is truncated or corrupt", "image has W x H pixels, over the limit N").
    """
    img = _open(source)
    try:
        # Check the declared size *before* decoding pixels: a 100 kB PNG can declare 40000 x 40000.
        limit = max_pixels if max_pixels is not None else Image.MAX_IMAGE_PIXELS
        w, h = img.size
        if limit is not None and w * h > limit:
            raise ImageError(f"image has {w} x {h} pixels, over the limit {limit}")
        if w == 0 or h == 0:
            raise ImageError(f"image has {w} x {h} pixels (no content)")
        try:
            img.seek(0)
        except (EOFError, AttributeError, ValueError):
            pass
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            # Another library switched Pillow to silently pad truncated files; we want to know.
            ImageFile.LOAD_TRUNCATED_IMAGES = False
        try:
            img.load()
        except (OSError, SyntaxError, ValueError, EOFError, IndexError, MemoryError) as err:
            detail = str(err) or type(err).__name__
            raise ImageError(f"image is truncated or corrupt ({detail})") from None
        try:
            oriented = ImageOps.exif_transpose(img)
        except Exception:  # a malformed EXIF block must not cost a good image; keep it unrotated
            oriented = img
        out = _to_rgb(oriented if oriented is not None else img)
        # img is closed below (it may hold an open file); never hand back that very object.
        return out.copy() if out is img else out
    finally:
        img.close()


def image_to_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` (bicubic, antialiased) and centre-crop: uint8 tensor (3, size, size)."""
    import torch

    if img.mode != "RGB":
        img = _to_rgb(img)
    x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # (3, h, w), channels-last in memory
    return resize_crop(x.unsqueeze(0), size)[0].contiguous()


def resized_shape(w: int, h: int, size: int) -> tuple[int, int]:
    """(new_w, new_h): the shorter side becomes ``size``, the long side is truncated (torchvision's Resize(int))."""
    if w <= h:
        return size, max(size, int(size * h / w))
    return max(size, int(size * w / h)), size


def resize_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) on the CPU -> uint8 (N, 3, size, size): shorter side to ``size``, bicubic, centre crop.

    torch's uint8 bicubic with antialiasing computes what Pillow's ``Image.resize(BICUBIC)`` does (separable
    passes, Pillow's filter support and rounding; the same pixels to within a level or two) at a fraction of
    Pillow's CPU cost, which matters because the resize is a large share of an image's work before the encoder.
    """
    import torch.nn.functional as F

    h, w = x.shape[-2:]
    new_w, new_h = resized_shape(w, h, size)
    if (new_w, new_h) != (w, h):
        x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return x[..., top : top + size, left : left + size]
