"""Per-row checks that Great Expectations cannot express: files on disk and bytes in strings.

``crossmodal.validation.validate`` runs them; they are public so that a notebook can reuse them.

Usage::

    from pathlib import Path
    from crossmodal.config import ValidationConfig
    from crossmodal.validation.rows import check_rows
    checks = check_rows(df, data_root=Path("data/demo"), cfg=ValidationConfig())   # df from read_manifest
    checks.reasons[i]   # None, or (kind, message) for the first problem of row i
    checks.paths[i]     # the absolute, resolved image path (None when the row failed)
    checks.sha256[i]    # hex digest of the image file's bytes (None when the row failed)
    checks.missing_image[i], checks.missing_text[i]   # the cell is absent (null/empty), allowed by config

Checks, in order (the first failure is the row's reason): the image path resolves, following symlinks, inside
the data root; the file exists, is not empty and is within ``max_image_bytes``; it decodes with
``crossmodal.data.images.load_image`` within ``max_image_pixels``; every string cell is valid UTF-8, holds one
value (not a JSON list or object) and, except the text, no NUL. An absent image or text passes when
``cfg.allow_missing`` names it (its checks are skipped); a row with neither is always quarantined.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from crossmodal.config import ValidationConfig
from crossmodal.data.images import ImageError, load_image

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
    from crossmodal.data.text import clean_text

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


# load_image's reasons -> countable kinds for the report's summary (first matching prefix wins)
_IMAGE_KINDS = [("not a decodable image: the file holds text", "image file holds text"),
                ("unsupported image format", "image format unsupported"),
                ("not a decodable", "image not decodable"), ("image is truncated", "image truncated or corrupt"),
                ("image has", "image over the pixel limit"), ("image is too large", "image over the pixel limit"),
                ("file is empty", "image file empty"), ("file not found", "image file not found")]


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def resolve_image(raw: object, root_real: Path, cfg: ValidationConfig) -> tuple[Reason | None, Path | None]:
    """Return (reason, resolved path) for one image cell: present, inside the root, a regular file, size limits."""
    if raw is None or not str(raw).strip():
        return ("image path missing", "image path is missing"), None
    raw = str(raw)
    if problem := utf8_problem(raw):
        return ("image path not valid UTF-8", f"image path is not valid UTF-8 ({problem})"), None
    if "\x00" in raw:
        return ("image path invalid", "image path contains a NUL character"), None
    given = Path(raw)
    lexical = Path(os.path.normpath(given if given.is_absolute() else root_real / given))
    real = Path(os.path.realpath(lexical))
    if not _inside(real, root_real):
        via = " through a symlink" if _inside(lexical, root_real) else ""
        return ("image path outside data root",
                f"image path {raw!r} resolves{via} to {real}, outside the data root {root_real}; "
                "move the file under the data root or set data.data_root"), None
    if not real.exists():
        return ("image file not found", f"image file not found: {raw!r} (looked for {real})"), None
    if not real.is_file():
        return ("image path not a file", f"image path {raw!r} is not a regular file"), None
    size = real.stat().st_size
    if size == 0:
        return ("image file empty", f"image file {raw!r} is empty (0 bytes)"), None
    if size > cfg.max_image_bytes:
        return ("image file too large", f"image file {raw!r} is {size} bytes, over the limit "
                f"{cfg.max_image_bytes} (validation.max_image_bytes)"), None
    return None, real


def decode_image(real: Path, cfg: ValidationConfig) -> tuple[str | None, str | None]:
    """Return (problem, sha256) for a resolved file: the problem is load_image's reason, or None."""
    try:
        data = real.read_bytes()
    except OSError as err:
        return f"cannot be read: {err.strerror or err}", None
    try:
        load_image(data, max_pixels=cfg.max_image_pixels)
    except ImageError as err:
        return str(err), None
    return None, hashlib.sha256(data).hexdigest()


def check_image(raw: object, root_real: Path, cfg: ValidationConfig) -> tuple[Reason | None, str | None, str | None]:
    """Return (reason, resolved path, sha256) for one image cell."""
    reason, real = resolve_image(raw, root_real, cfg)
    if reason is not None:
        return reason, None, None
    return _image_outcome(str(raw), real, *decode_image(real, cfg))


def _image_outcome(raw: str, real: Path, problem: str | None,
                   digest: str | None) -> tuple[Reason | None, str | None, str | None]:
    if problem is None:
        return None, str(real), digest
    if problem.startswith("cannot be read"):
        return ("image file unreadable", f"image file {raw!r} {problem}"), None, None
    kind = next((k for prefix, k in _IMAGE_KINDS if problem.startswith(prefix)), "image unusable")
    return (kind, f"image {raw!r}: {problem}"), None, None


def cell_problem(col: str, value: object) -> Reason | None:
    """A reason when a string cell cannot be used as is: not UTF-8, a nested value, a NUL in a key column."""
    if getattr(value, "structured", False):  # a JSON list or object where one value belongs (see read_manifest)
        return (f"{col} not a single value", f"{col} is a {value.structured}, not a single value: {value[:60]!r}")
    if not isinstance(value, str):
        return None
    if problem := utf8_problem(value):
        return (f"{col} not valid UTF-8", f"{col} is not valid UTF-8 ({problem}); re-save the manifest as UTF-8")
    if "\x00" in value and col != "text":  # captions lose their NULs in clean_text; a NUL in a key is corruption
        return (f"{col} invalid", f"{col} contains a NUL character ({value!r}); fix the manifest")
    return None


def check_rows(df: pd.DataFrame, data_root: str | Path, cfg: ValidationConfig) -> RowChecks:
    """Run the row checks over the canonical frame from ``read_manifest``; lists follow ``df``'s order.

    Each distinct image cell is resolved once and each distinct file decoded once: many rows may share an image
    (one photo, several captions), and a million-row manifest must not decode the same file a million times.
    """
    root_real = Path(os.path.realpath(data_root))
    out = RowChecks()
    images, texts = df["image"].tolist(), df["text"].tolist()
    no_image = [image_absent(v) for v in images]
    absent_text: dict[object, bool] = {}
    no_text = [absent_text.setdefault(v, text_absent(v)) if isinstance(v, str) else text_absent(v) for v in texts]
    allow_image, allow_text = cfg.allow_missing in ("image", "either"), cfg.allow_missing in ("text", "either")
    resolved: dict[object, tuple[Reason | None, Path | None]] = {}
    for raw, gone in zip(images, no_image):
        if not (gone and allow_image) and raw not in resolved:
            resolved[raw] = resolve_image(raw, root_real, cfg)
    files = list(dict.fromkeys(real for _, real in resolved.values() if real is not None))
    # Decoding dominates; Pillow releases the GIL while decoding, so threads help on big images.
    workers = min(8, os.cpu_count() or 1) if len(files) > 64 else 1
    with ThreadPoolExecutor(max_workers=workers) as pool:
        decoded = dict(zip(files, pool.map(lambda f: decode_image(f, cfg), files)))
    outcome = {raw: (reason, None, None) if reason is not None else _image_outcome(str(raw), real, *decoded[real])
               for raw, (reason, real) in resolved.items()}
    # Other cells: one check per distinct value of each column (labels and splits repeat a lot).
    cols = ("text", "id", "label", "split", "group")
    problems = []
    for col in cols:
        values = df[col].tolist()
        memo: dict[object, Reason | None] = {}
        for v in values:
            if v is not None and v not in memo:
                memo[v] = cell_problem(col, v)
        problems.append([memo[v] if v is not None else None for v in values] if any(memo.values()) else None)
    for i, raw in enumerate(images):
        if no_image[i] and no_text[i]:
            reason, path, digest = NO_MODALITY, None, None
        elif no_image[i] and allow_image:
            reason, path, digest = None, None, None  # absent and allowed: the image checks do not apply
        else:
            reason, path, digest = outcome[raw]
        if reason is None:
            for col_problems in problems:
                if col_problems is not None and col_problems[i] is not None:
                    reason, path, digest = col_problems[i], None, None
                    break
        out.reasons.append(reason)
        out.paths.append(path)
        out.sha256.append(digest)
        out.missing_image.append(no_image[i] and allow_image and reason is None)
        out.missing_text.append(no_text[i] and allow_text and reason is None)
    return out
