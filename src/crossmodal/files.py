"""Atomic file writes and content hashes: a reader sees the old file or the new one, never half of either.

    from crossmodal.files import atomic_path, write_json
    with atomic_path("out/table.parquet") as tmp:   # any library writes to tmp; renamed onto the path on success
        frame.to_parquet(tmp)
    write_json("reports/summary.json", {"rows": len(frame)})

The temporary file sits in the destination's folder (so the rename is atomic) under a unique name that carries the
writer's host and pid (two writers never share one, and a sweep of a dead writer's leftovers on a folder several
machines share can tell whose they are: ``crossmodal.features.shelf.sweep_stale_tmp``), is flushed to disk before
the rename, and is removed if writing fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

HOST = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:63] or "localhost"  # as it appears in temporary names


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to; renamed onto ``path`` when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.@{HOST}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A temporary folder to fill with ``path``'s new content; it takes ``path``'s place when the block ends without
    error. A writer killed midway leaves the old folder (or none), never a half-written one: a task that dies on
    one worker and runs again on another finds no partial output to trip over."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}"
    tmp, old = path.parent / f"{stem}.tmp", path.parent / f"{stem}.old"
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            os.replace(path, old)  # a folder cannot be renamed onto a non-empty one: move it aside first
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_json(path: str | Path, obj: Any, **dumps: Any) -> Path:
    """``json.dumps(obj, indent=2, **dumps)`` plus a final newline, written atomically."""
    return write_bytes(path, (json.dumps(obj, indent=2, **dumps) + "\n").encode("utf-8"))


# --------------------------------------------------------------------------- content hashes


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (memory stays flat for large files)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """sha256 over the crossmodal package's files (names and bytes): a change to the code misses every stage entry.

    Computed once per process, from the code the process imported (an edit made while a long-lived worker runs
    takes effect, for it as for the cache, when it restarts).
    """
    import crossmodal

    root = Path(crossmodal.__file__).resolve().parent
    h = hashlib.sha256(f"crossmodal {crossmodal.__version__}\n".encode())
    for path in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                       and p.suffix not in (".pyc", ".pyo")):
        rel = path.relative_to(root).as_posix().encode()
        data = path.read_bytes()
        h.update(len(rel).to_bytes(8, "little") + rel + len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def digest(obj: Any) -> str:
    """sha256 of ``obj`` as canonical JSON (sorted keys): the key of a stage from its inputs and settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()
