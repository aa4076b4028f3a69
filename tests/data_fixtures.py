"""Helpers for the data tests: tiny images drawn with Pillow and manifests written in any format."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from PIL import Image

from crossmodal.config import Config, from_dict

COLORS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200),
          (120, 60, 10), (10, 60, 120), (90, 90, 90), (250, 250, 250), (5, 5, 5), (140, 200, 90)]


def image_bytes(i: int = 0, size: tuple[int, int] = (32, 32), fmt: str = "JPEG", mode: str = "RGB") -> bytes:
    """A small image, different for each ``i`` (so content hashes differ)."""
    img = Image.new("RGB", size, COLORS[i % len(COLORS)])
    img.putpixel((i % size[0], (i // size[0]) % size[1]), (i * 37 % 256, i * 91 % 256, i * 13 % 256))
    if mode != "RGB":
        img = img.convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_image(path: Path, i: int = 0, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(i, **kwargs))
    return path


def good_rows(root: Path, n: int = 8, labels: tuple[str, ...] = ("cat", "dog"), start: int = 0) -> list[dict]:
    """``n`` valid rows with their images written under ``root/images``; labels alternate."""
    rows = []
    for k in range(start, start + n):
        write_image(root / "images" / f"ok{k}.jpg", k)
        rows.append({"id": f"ok{k}", "image": f"images/ok{k}.jpg", "text": f"a picture number {k}",
                     "label": labels[k % len(labels)]})
    return rows


def write_csv(path: Path, rows: list[dict], columns: list[str] | None = None) -> Path:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    path.parent.mkdir(parents=True, exist_ok=True)
    # surrogateescape writes lone surrogates back as the raw (invalid UTF-8) bytes they stand for
    with open(path, "w", newline="", encoding="utf-8", errors="surrogateescape") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({c: ("" if r.get(c) is None else r.get(c)) for c in columns})
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def fast_config(**validation) -> Config:
    """Defaults, with validation knobs overridden."""
    return from_dict({"validation": validation} if validation else {})
