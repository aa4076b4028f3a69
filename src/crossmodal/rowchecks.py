"""Per-row checks that Great Expectations cannot express: files on disk and bytes in strings.

Usage (``crossmodal.validate`` calls this; it is public so a notebook can reuse it)::

    from crossmodal.rowchecks import check_rows
    checks = check_rows(df, data_root=Path("data/demo"), cfg=ValidationConfig())
    checks.reasons[i]   # None, or (kind, message) for the first problem of row i
    checks.paths[i]     # the absolute, resolved image path (None when the row failed)
    checks.sha256[i]    # hex digest of the image file's bytes (None when the row failed)
    checks.missing_image[i], checks.missing_text[i]   # the cell is absent (null/empty), allowed by config

A row whose image and text cells are both absent is quarantined ("no image and no text") whatever
``allow_missing`` says. Otherwise, with ``cfg.allow_missing`` naming the absent modality ("image",
"text" or "either"), the row passes with that modality marked missing (its image checks are skipped).

Checks, in order (the first failure is the row's reason): image path present; it resolves,
following symlinks, to a file inside the data root (absolute paths are allowed only inside
it); the file exists, is not empty, is at most ``max_image_bytes``; it decodes with
``crossmodal.preprocess.load_image`` within ``max_image_pixels``; then every string cell
(image, text, id, label, split, group) is valid UTF-8 (the manifest reader keeps
undecodable bytes as lone surrogates so that this check can name them).
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from crossmodal.config import ValidationConfig
from crossmodal.preprocess import ImageError, load_image

Reason = tuple[str, str]  # (kind: short and countable, message: names the value and what is wrong)


@dataclass
class RowChecks:
    reasons: list[Reason | None] = field(default_factory=list)
    paths: list[str | None] = field(default_factory=list)
    sha256: list[str | None] = field(default_factory=list)
    missing_image: list[bool] = field(default_factory=list)
    missing_text: list[bool] = field(default_factory=list)


def image_absent(value: object) -> bool:
    """An image cell with nothing in it: null/NaN or blank."""
    return value is None or value != value or (isinstance(value, str) and not value.strip())


def text_absent(value: object) -> bool:
    """A text cell with nothing in it: null/NaN, or nothing left after ``clean_text``."""
    from crossmodal.preprocess import clean_text

    return value is None or value != value or (isinstance(value, str) and not clean_text(value))


NO_MODALITY: Reason = ("no image and no text", "no image and no text: a row needs at least one of them")


def utf8_problem(value: str) -> str | None:
    """None if ``value`` encodes as UTF-8; else where the first undecodable byte was."""
    try:
        value.encode("utf-8")
        return None
    except UnicodeEncodeError as err:
        ch = value[err.start]
        if 0xDC80 <= ord(ch) <= 0xDCFF:  # surrogateescape's stand-in for one raw byte
            return f"undecodable byte 0x{ord(ch) - 0xDC00:02X} at character {err.start}"
        return f"lone surrogate U+{ord(ch):04X} at character {err.start}"


# load_image's reasons -> countable kinds for the report's summary
_IMAGE_KINDS = [("not a decodable", "image not decodable"), ("image is truncated", "image truncated or corrupt"),
                ("image has", "image over the pixel limit"), ("image is too large", "image over the pixel limit"),
                ("file is empty", "image file empty"), ("file not found", "image file not found")]


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def check_image(raw: object, root_real: Path, cfg: ValidationConfig) -> tuple[Reason | None, str | None, str | None]:
    """Return (reason, resolved path, sha256) for one image cell."""
    if raw is None or not str(raw).strip():
        return ("image path missing", "image path is missing"), None, None
    raw = str(raw)
    if problem := utf8_problem(raw):
        return ("image path not valid UTF-8", f"image path is not valid UTF-8 ({problem})"), None, None
    if "\x00" in raw:
        return ("image path invalid", "image path contains a NUL character"), None, None
    given = Path(raw)
    lexical = Path(os.path.normpath(given if given.is_absolute() else root_real / given))
    real = Path(os.path.realpath(lexical))
    if not _inside(real, root_real):
        via = " through a symlink" if _inside(lexical, root_real) else ""
        return ("image path outside data root",
                f"image path {raw!r} resolves{via} to {real}, outside the data root {root_real}; "
                "move the file under the data root or set data.data_root"), None, None
    if not real.exists():
        return ("image file not found", f"image file not found: {raw!r} (looked for {real})"), None, None
    if not real.is_file():
        return ("image path not a file", f"image path {raw!r} is not a regular file"), None, None
    size = real.stat().st_size
    if size == 0:
        return ("image file empty", f"image file {raw!r} is empty (0 bytes)"), None, None
    if size > cfg.max_image_bytes:
        return ("image file too large", f"image file {raw!r} is {size} bytes, over the limit "
                f"{cfg.max_image_bytes} (validation.max_image_bytes)"), None, None
    try:
        data = real.read_bytes()
    except OSError as err:
        return ("image file unreadable", f"image file {raw!r} cannot be read: {err.strerror or err}"), None, None
    try:
        load_image(data, max_pixels=cfg.max_image_pixels)
    except ImageError as err:
        msg = str(err)
        kind = next((k for prefix, k in _IMAGE_KINDS if msg.startswith(prefix)), "image unusable")
        return (kind, f"image {raw!r}: {msg}"), None, None
    return None, str(real), hashlib.sha256(data).hexdigest()


def check_rows(df: pd.DataFrame, data_root: str | Path, cfg: ValidationConfig) -> RowChecks:
    """Run the row checks over the canonical frame from ``read_manifest``; lists follow ``df``'s order."""
    root_real = Path(os.path.realpath(data_root))
    out = RowChecks()
    rows = list(df[["image", "text", "id", "label", "split", "group"]].itertuples(index=False))
    no_image = [image_absent(r.image) for r in rows]
    no_text = [text_absent(r.text) for r in rows]
    allow_image, allow_text = cfg.allow_missing in ("image", "either"), cfg.allow_missing in ("text", "either")

    def image_check(k: int):
        if no_image[k] and no_text[k]:
            return NO_MODALITY, None, None
        if no_image[k] and allow_image:
            return None, None, None
        return check_image(rows[k].image, root_real, cfg)

    # Decoding dominates; Pillow releases the GIL while decoding, so threads help on big images.
    workers = min(8, os.cpu_count() or 1) if len(rows) > 64 else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        images = list(pool.map(image_check, range(len(rows))))
    for k, (row, (reason, path, digest)) in enumerate(zip(rows, images)):
        if reason is None:
            for col in ("text", "id", "label", "split", "group"):
                value = getattr(row, col)
                if isinstance(value, str) and (problem := utf8_problem(value)):
                    reason = (f"{col} not valid UTF-8", f"{col} is not valid UTF-8 ({problem}); re-save the "
                              "manifest as UTF-8")
                    path = digest = None
                    break
        out.reasons.append(reason)
        out.paths.append(path)
        out.sha256.append(digest)
        out.missing_image.append(no_image[k] and allow_image and reason is None)
        out.missing_text.append(no_text[k] and allow_text and reason is None)
    return out
