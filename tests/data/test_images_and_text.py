"""load_image / image_to_tensor / clean_text: modes, orientation, and every broken file as an ImageError."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from crossmodal.data.images import ImageError, image_to_tensor, load_image
from crossmodal.data.text import clean_text


def _save(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_path_and_bytes_give_the_same_rgb_image(tmp_path, image_bytes):
    data = image_bytes(3, size=(40, 30), fmt="PNG")
    p = tmp_path / "x.png"
    p.write_bytes(data)
    a, b = load_image(p), load_image(data)
    assert a.mode == "RGB" and a.size == (40, 30)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert load_image(str(p)).size == (40, 30)


def test_file_not_found(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_image(tmp_path / "missing.jpg")


def test_empty_file_and_empty_bytes(tmp_path):
    p = tmp_path / "e.jpg"
    p.write_bytes(b"")
    for src in (p, b""):
        with pytest.raises(ImageError, match="file is empty"):
            load_image(src)


def test_not_an_image():
    with pytest.raises(ImageError, match="not a decodable image"):
        load_image(b"hello, I am text pretending to be a JPEG\n")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_truncated_image(fmt):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    data = _save(img, fmt)
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_declared_size_over_max_pixels():
    data = _save(Image.new("RGB", (100, 80)))
    with pytest.raises(ImageError, match="image has 100 x 80 pixels, over the limit 4000"):
        load_image(data, max_pixels=4000)
    assert load_image(data, max_pixels=8000).size == (100, 80)


def _png_with_declared_size(w: int, h: int) -> bytes:
    data = bytearray(_save(Image.new("L", (1, 1))))
    ihdr = struct.pack(">II", w, h) + bytes(data[24:29])  # width, height, then depth/colour/... unchanged
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_decompression_bomb_is_an_image_error_not_a_warning(recwarn):
    bomb = _png_with_declared_size(30000, 30000)  # 900 M pixels declared in a ~70-byte file
    with pytest.raises(ImageError, match=r"image has 900000000 pixels, over the limit \d+"):
        load_image(bomb)  # Pillow's own limit (no max_pixels given) refuses it while opening
    warned = _png_with_declared_size(12000, 12000)  # over Pillow's warning level, under its error level
    with pytest.raises(ImageError, match=f"image has 12000 x 12000 pixels, over the limit {Image.MAX_IMAGE_PIXELS}"):
        load_image(warned)
    with pytest.raises(ImageError, match="image has 12000 x 12000 pixels, over the limit 1000000"):
        load_image(warned, max_pixels=10**6)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]


def test_exif_orientation_applied():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    out = load_image(_save(img, "JPEG", exif=exif.tobytes()))
    assert out.size == (20, 40)


def test_modes_converted_to_rgb():
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black -> white, as a viewer shows it
    assert load_image(_save(rgba)).getpixel((0, 0)) == (255, 255, 255)
    la = Image.new("LA", (8, 8), (100, 255))
    assert load_image(_save(la)).getpixel((0, 0)) == (100, 100, 100)
    pal = Image.new("RGB", (8, 8), (10, 200, 30)).convert("P")
    assert load_image(_save(pal)).getpixel((0, 0)) == pal.convert("RGB").getpixel((0, 0))
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    r, g, b = load_image(_save(cmyk, "JPEG")).getpixel((0, 0))
    assert r > 200 and g < 60 and b < 60
    bw = Image.new("1", (8, 8), 1)
    assert load_image(_save(bw)).getpixel((0, 0)) == (255, 255, 255)


def test_16_bit_greyscale_scaled_not_clipped():
    arr = np.array([[0, 32896, 65535]], dtype=np.uint16)
    img = Image.fromarray(arr)  # mode I;16
    out = np.asarray(load_image(_save(img)))
    assert out[0, :, 0].tolist() == [0, 128, 255]


def test_first_frame_of_animation():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    r, g, b = load_image(buf.getvalue()).getpixel((4, 4))
    assert r > 200 and b < 50


@pytest.mark.parametrize("size", [(64, 32), (32, 64), (48, 48), (10, 7)])
def test_image_to_tensor_shape_and_dtype(size):
    import torch

    t = image_to_tensor(Image.new("RGB", size, (1, 2, 3)), 24)
    assert t.shape == (3, 24, 24) and t.dtype == torch.uint8
    assert t[:, 12, 12].tolist() == [1, 2, 3]


def test_image_to_tensor_center_crops():
    arr = np.zeros((20, 60, 3), dtype=np.uint8)
    arr[:, 20:40] = 255  # a white band in the middle third of a wide image
    t = image_to_tensor(Image.fromarray(arr), 20)
    assert t.float().mean() > 240  # after crop only the band remains


@pytest.mark.parametrize("raw,clean", [
    ("  hello \t\n world  ", "hello world"),
    ("e\u0301cole", "\u00e9cole"),  # NFC
    ("zero\u200bwidth\ufeff", "zerowidth"),
    ("nul\x00byte\x07", "nulbyte"),
    ("a\u00a0b", "a b"),  # non-breaking space is whitespace too
    ("\u200b \u200d", ""),
    ("family \U0001F468\u200d\U0001F469\u200d\U0001F467", "family \U0001F468\u200d\U0001F469\u200d\U0001F467"),  # emoji ZWJ
    ("\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645", "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"),  # Persian ZWNJ
    ("zero\u200dwidth\u200c", "zerowidth"),  # a joiner in ASCII text is noise
    (None, ""),
])
def test_clean_text(raw, clean):
    assert clean_text(raw) == clean
