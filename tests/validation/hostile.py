"""A corpus of hostile inputs, generated into a folder (no binary files in the repository), each with its outcome.

Usage (test_hostile.py in this folder does this; ``good_rows`` is the fixture of tests/conftest.py)::

    from tests.validation import hostile
    root = tmp_path / "data"
    manifest = hostile.write_row_corpus(root, good_rows(root, 16, prefix="good"))  # good rows + every case
    # each Case names its row ids, whether they are kept or quarantined, and the reason's text

Row cases share one manifest (next to good rows, so two classes remain and the quarantine stays under the limit);
manifest-level cases (byte-order mark, semicolons, mixed types, a million rows) write a manifest each. The good rows
are the caller's (written under the same root), so this module needs nothing from the test fixtures: the
validation benchmark (benchmarks/validate.py) imports it too.
"""

from __future__ import annotations

import io
import json
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

RED, BLUE, GREEN = (220, 20, 20), (20, 20, 220), (20, 200, 20)


@dataclass
class Case:
    name: str
    expect: str  # "kept" or "quarantined"
    reason: str = ""  # a substring of the quarantine reason
    rows: list[dict] = field(default_factory=list)  # the case's manifest rows (filled by write_row_corpus)
    make: Callable[[Path], list[dict]] | None = None


# ----------------------------------------------------------------------------- image bytes
def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def two_colour(size=(40, 20), left=RED, right=BLUE) -> Image.Image:
    """Left half ``left``, right half ``right``: shows which way an image was turned."""
    img = Image.new("RGB", size, right)
    img.paste(Image.new("RGB", (size[0] // 2, size[1]), left), (0, 0))
    return img


def png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring ``width`` x ``height`` pixels, with almost no data (a few hundred bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    idat = zlib.compress(b"\0" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def exif_rotated_jpeg() -> tuple[bytes, Image.Image]:
    """A JPEG stored sideways with EXIF orientation 6 ("rotate 90 clockwise to view"), and how it must look."""
    upright = two_colour((20, 40), left=RED, right=BLUE)  # 20 wide, 40 tall
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a phone writes: the sensor's landscape pixels
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes()), upright


def sixteen_bit_png() -> bytes:
    img = Image.new("I;16", (16, 16))
    img.putdata([k * 256 for k in range(256)])  # 0 .. 65280: convert("L") would clip almost all of it to white
    return encode(img, "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), RED), Image.new("RGB", (16, 16), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def palette_png() -> bytes:
    """Palette image, green with one transparent red corner pixel (a palette entry marked transparent)."""
    img = Image.new("RGB", (16, 16), GREEN)
    img.putpixel((0, 0), RED)
    img = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    return encode(img, "PNG", transparency=img.getpixel((0, 0)))


def heic_like() -> bytes:
    """The start of an iPhone HEIC file: an ISO-BMFF ftyp box with brand heic (Pillow cannot decode it)."""
    ftyp = b"ftypheic" + b"\0\0\0\0" + b"mif1heic"
    return struct.pack(">I", len(ftyp) + 4) + ftyp + b"\0" * 200


SVG = (b'<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
       b'<rect width="10" height="10" fill="red"/></svg>\n')


# ----------------------------------------------------------------------------- the row cases
def _img(root: Path, name: str, data: bytes) -> str:
    path = root / "images" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return f"images/{name}"


def _row(rid: str, image: str, text: str = "a perfectly ordinary caption", label: object = "cat") -> dict:
    return {"id": rid, "image": image, "text": text, "label": label}


def _ok_image(root: Path, rid: str, colour=GREEN) -> str:
    return _img(root, f"{rid}.png", encode(Image.new("RGB", (16, 16), colour), "PNG"))


def _symlink_out(root: Path) -> list[dict]:
    outside = root.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.png").write_bytes(encode(Image.new("RGB", (8, 8), RED), "PNG"))
    link = root / "images" / "escape.png"
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(outside / "secret.png", link)
    return [_row("symlink-out", "images/escape.png")]


MEGABYTE_TEXT = ("lorem ipsum dolor sit amet " * 40_000)[:1_000_000]

ROW_CASES: list[Case] = [
    Case("bomb-over-pillow-limit", "quarantined", "image has 1600000000 pixels, over the limit",
         make=lambda r: [_row("bomb-over-pillow-limit", _img(r, "bomb.png", png_bomb(40_000, 40_000)))]),
    Case("bomb-over-our-limit", "quarantined", "image has 10000 x 10000 pixels, over the limit 50000000",
         make=lambda r: [_row("bomb-over-our-limit", _img(r, "bomb2.png", png_bomb(10_000, 10_000)))]),
    Case("16-bit", "kept", make=lambda r: [_row("16-bit", _img(r, "grey16.png", sixteen_bit_png()))]),
    Case("cmyk", "kept", make=lambda r: [_row(
        "cmyk", _img(r, "cmyk.jpg", encode(Image.new("RGB", (16, 16), RED).convert("CMYK"), "JPEG", quality=95)))]),
    Case("palette", "kept", make=lambda r: [_row("palette", _img(r, "palette.png", palette_png()))]),
    Case("grayscale", "kept", make=lambda r: [_row(
        "grayscale", _img(r, "grey.png", encode(Image.new("L", (16, 16), 128), "PNG")))]),
    Case("la", "kept", make=lambda r: [_row("la", _img(r, "la.png", encode(Image.new("LA", (16, 16), (90, 255)), "PNG")))]),
    Case("rgba", "kept", make=lambda r: [_row(
        "rgba", _img(r, "rgba.png", encode(Image.new("RGBA", (16, 16), (20, 20, 220, 0)), "PNG")))]),
    Case("exif-rotated", "kept", make=lambda r: [_row("exif-rotated", _img(r, "rotated.jpg", exif_rotated_jpeg()[0]))]),
    Case("animated-gif", "kept", make=lambda r: [_row("animated-gif", _img(r, "anim.gif", animated_gif()))]),
    Case("webp", "kept", make=lambda r: [_row(
        "webp", _img(r, "photo.webp", encode(Image.new("RGB", (16, 16), BLUE), "WEBP", lossless=True)))]),
    Case("svg", "quarantined", "unsupported image format (svg)",
         make=lambda r: [_row("svg", _img(r, "vector.svg", SVG))]),
    Case("heic", "quarantined", "unsupported image format (heic)",
         make=lambda r: [_row("heic", _img(r, "iphone.heic", heic_like()))]),
    Case("text-as-jpg", "quarantined", "the file holds text, not image data (it starts with 'Dear diary",
         make=lambda r: [_row("text-as-jpg", _img(r, "letter.jpg", b"Dear diary,\ntoday I saved a note as .jpg\n"))]),
    Case("symlink-out", "quarantined", "resolves through a symlink to", make=_symlink_out),
    Case("megabyte-text", "kept",
         make=lambda r: [_row("megabyte-text", _ok_image(r, "megabyte"), text=MEGABYTE_TEXT)]),
    Case("rtl", "kept", make=lambda r: [_row("rtl", _ok_image(r, "rtl"), text="שלום עולם, مرحبا بالعالم")]),
    Case("emoji", "kept", make=lambda r: [_row("emoji", _ok_image(r, "emoji"), text="best day ever 🎉🔥👍🏽 👨‍👩‍👧")]),
    Case("zero-width", "kept", make=lambda r: [_row("zero-width", _ok_image(r, "zw"), text="zero\u200bwidth\u2060 text")]),
    Case("nul-in-text", "kept", make=lambda r: [_row("nul-in-text", _ok_image(r, "nul"), text="nul\x00 in the\x00middle")]),
    Case("nul-in-label", "quarantined", "label contains a NUL character",
         make=lambda r: [_row("nul-in-label", _ok_image(r, "nul-label"), label="cat\x00")]),
    Case("text-as-list", "quarantined", "text is a JSON list, not a single value",
         make=lambda r: [_row("text-as-list", _ok_image(r, "list"), text=["two", "captions"])]),
    Case("only-control-chars", "quarantined", "text is empty",
         make=lambda r: [_row("only-control-chars", _ok_image(r, "ctl"), text="\x00\x01\u200b\x7f")]),
]

# What the kept cases must look like after load_image (RGB): pixels checked and their expected values (+- 8).
EXPECTED_PIXELS = {
    "cmyk": [((8, 8), RED)], "grayscale": [((8, 8), (128, 128, 128))],
    "palette": [((8, 8), GREEN), ((0, 0), (255, 255, 255))],  # the transparent entry is shown on white
    "la": [((8, 8), (90, 90, 90))], "rgba": [((8, 8), (255, 255, 255))],  # fully transparent: white
    "animated-gif": [((8, 8), RED)], "webp": [((8, 8), BLUE)],
    # 0 .. 65280 of 65535, scaled to 0 .. 254; clipping (convert("L")) would make nearly every pixel white
    "16-bit": [((0, 0), (0, 0, 0)), ((0, 8), (127, 127, 127)), ((15, 15), (254, 254, 254))],
    "exif-rotated": [((4, 20), RED), ((15, 20), BLUE)],  # upright: 20 wide, 40 tall, red on the left
}
CLEAN_TEXT = {"zero-width": "zerowidth text", "nul-in-text": "nul in themiddle",
              "rtl": "שלום עולם, مرحبا بالعالم", "emoji": "best day ever 🎉🔥👍🏽 👨‍👩‍👧"}


def write_row_corpus(root: Path, good: list[dict], cases: list[Case] = ROW_CASES) -> Path:
    """Write every row case under ``root``, after the ``good`` rows (their images already under ``root``); return the
    JSON Lines manifest."""
    rows = list(good)
    for case in cases:
        case.rows = case.make(root)
        rows += case.rows
    manifest = root / "manifest.jsonl"
    # ensure_ascii keeps NULs and lone characters as \\u escapes: the file itself stays plain UTF-8 text.
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return manifest


# ----------------------------------------------------------------------------- manifest-level cases
def write_labels_by_case(root: Path, rows: list[dict]) -> Path:
    """Labels that differ only by case or surrounding spaces: 'cat', 'Cat ', ' CAT', and 'dog' (12 good ``rows``,
    changed in place)."""
    for k, spelling in enumerate(["cat", "Cat ", " CAT", "cat", "Cat ", " CAT"]):
        rows[2 * k]["label"] = spelling
    path = root / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_numeric_and_mixed(root: Path, rows: list[dict]) -> Path:
    """JSON Lines with mixed types: int, float and str labels (1, 1.0, "1", 0), an int id, a number as text (12 good
    ``rows``, changed in place)."""
    for k, r in enumerate(rows):
        r["label"] = [1, 1.0, "1", 0, "0", 0.0][k % 6]
        if k == 3:
            r["id"] = 12345
        if k == 5:
            r["text"] = 42
    path = root / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_delimited(root: Path, rows: list[dict], sep: str, bom: bool = False, name: str = "manifest.csv") -> Path:
    """A CSV manifest of the good ``rows`` with separator ``sep`` (and a byte-order mark), the first caption holding
    the separator in quotes."""
    rows[0]["text"] = f"quoted{sep} with the separator inside"
    lines = [sep.join(["id", "image", "text", "label"])]
    for r in rows:
        lines.append(sep.join([r["id"], r["image"], f'"{r["text"]}"', r["label"]]))
    path = root / name
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + "\n").encode("utf-8"))
    return path


def write_csv_with_nul(root: Path, rows: list[dict]) -> Path:
    """A CSV manifest of the good ``rows`` whose first caption holds a NUL byte (in "caption")."""
    lines = ["id,image,text,label"] + [f'{r["id"]},{r["image"]},"{r["text"]}",{r["label"]}' for r in rows]
    lines[1] = lines[1].replace("caption", "cap\x00tion")
    path = root / "nul.csv"
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8"))
    return path


def write_many_rows(root: Path, n: int, distinct_images: int = 200, bad_every: int = 1000) -> Path:
    """A CSV manifest of ``n`` rows over ``distinct_images`` files (rows share images, as captions of one photo do);
    every ``bad_every``-th row names a missing file. Written with plain string joins: fast even for a million."""
    images = [_img(root, f"shared{k}.png", encode(Image.new("RGB", (16, 16), ((k * 7) % 256, (k * 13) % 256,
                                                                            (k * 29) % 256)), "PNG"))
              for k in range(distinct_images)]
    labels = ("cat", "dog", "bird")
    path = root / "many.csv"
    with open(path, "w", encoding="utf-8", newline="") as fh:
        fh.write("id,image,text,label\n")
        chunk = []
        for i in range(n):
            image = f"images/missing{i}.png" if bad_every and i % bad_every == bad_every - 1 else images[i % distinct_images]
            chunk.append(f"r{i},{image},caption {i} of a shared photo,{labels[i % 3]}\n")
            if len(chunk) == 100_000:
                fh.write("".join(chunk))
                chunk = []
        fh.write("".join(chunk))
    return path
