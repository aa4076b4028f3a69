"""Atomic file writes: a reader sees the old file or the new one, never half of either.

    with atomic_path("out/table.parquet") as tmp:   # any library writes to tmp
        pq.write_table(table, tmp)
    write_json("reports/summary.json", summary)

The temporary file sits in the destination's folder (so the rename is atomic) under a unique name (two writers
never share one), is flushed to disk before the rename, and is removed if writing fails.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """``json.dumps(obj, indent=2, **dumps)`` plus a final newline, written atomically."""
    return write_bytes(path, (json.dumps(obj, indent=2, **dumps) + "\n").encode("utf-8"))
