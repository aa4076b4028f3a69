"""The stage cache: each stage's outputs stored under a key of everything they depend on, so an unchanged stage is
skipped (as ``dvc repro`` skips a stage whose dependencies and params did not change).

    from crossmodal.pipeline.cache import StageCache
    cache = StageCache(cfg.paths.cache)
    entry = cache.lookup("train", key)             # a verified entry, or None
    if entry is not None:
        entry.restore(run_dir / "models")          # the outputs appear in the run folder
    else:
        train_all(..., run_dir / "models")
        cache.store("train", key, run_dir / "models", meta={"heads": [...]})

An entry is ``<paths.cache>/stages/<stage>/<key>/``: ``out/`` (the stage's output folder) and ``entry.json``
(``meta`` and every file's size and mtime_ns). Crash safety: an entry is assembled in a ``.tmp-*`` folder and
renamed into place in one step, and a lookup trusts it only when every listed file has its recorded size and
mtime, so a killed store, a truncated or an edited output is a miss (the stage runs again), never a wrong result.
Files are shared with run folders as hard links (copies where linking is impossible), so a run folder survives
deleting the cache; edit a copy, not a run folder's file: an in-place edit also shows in every folder sharing it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossmodal.artifacts import ENTRY_FILE
from crossmodal.files import write_json

log = logging.getLogger(__name__)

OUT_DIR = "out"
FORMAT = 1  # bump when the entry layout changes: older entries then miss
STALE_TMP_S = 24 * 3600  # a temporary folder this old is a leftover whatever its writer


def _host() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def tmp_name(what: str) -> str:
    """A temporary folder's name, ``.tmp-<what>-<host>-<pid>-<random>``: :func:`sweep_tmp` can tell its writer."""
    return f".tmp-{what}-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _place(src: Path, dst: Path) -> str:
    """``dst`` becomes ``src``'s content: a hard link, or a copy where linking is impossible. Returns which."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:  # another file system, no hard links there (FAT), or not permitted
        shutil.copy2(src, dst)
        return "copy"


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some platforms refuse fsync on a read-only handle; the rename order still protects
        pass
    finally:
        os.close(fd)


@dataclass
class Entry:
    stage: str
    key: str
    path: Path
    meta: dict[str, Any]
    files: dict[str, list[int]]  # relative path -> [size, mtime_ns]

    @property
    def out(self) -> Path:
        return self.path / OUT_DIR

    def restore(self, dst: str | Path) -> str:
        """Make ``dst`` hold the entry's outputs (hard links, else copies); returns "hardlink", "copy" or "mixed"."""
        dst = Path(dst)
        modes = {_place(self.out / rel, dst / rel) for rel in self.files}
        return modes.pop() if len(modes) == 1 else ("mixed" if modes else "hardlink")


class StageCache:
    def __init__(self, cache_dir: str | Path):
        self.root = Path(cache_dir) / "stages"

    def entry_dir(self, stage: str, key: str) -> Path:
        if not key or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"a stage key is a hex digest, got {key!r}")
        return self.root / stage / key

    def lookup(self, stage: str, key: str) -> Entry | None:
        """The entry of ``stage`` under ``key`` if it is complete and unchanged; None otherwise (a miss)."""
        path = self.entry_dir(stage, key)
        try:
            raw = json.loads((path / ENTRY_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            log.warning("ignoring stage cache entry %s: unreadable %s (%s)", path, ENTRY_FILE, err)
            return None
        if raw.get("format") != FORMAT or raw.get("key") != key or not isinstance(raw.get("files"), dict):
            log.warning("ignoring stage cache entry %s: not an entry of this format and key", path)
            return None
        for rel, recorded in raw["files"].items():
            try:
                st = (path / OUT_DIR / rel).stat()
            except OSError:
                log.warning("ignoring stage cache entry %s: %s is missing", path, rel)
                return None
            if [st.st_size, st.st_mtime_ns] != recorded:
                log.warning("ignoring stage cache entry %s: %s changed since it was stored", path, rel)
                return None
        return Entry(stage, key, path, raw.get("meta") or {}, raw["files"])

    def store(self, stage: str, key: str, src: str | Path, meta: dict[str, Any] | None = None) -> Entry:
        """Store the folder ``src`` (a stage's finished outputs) as the entry of ``stage`` under ``key``.

        Replaces an entry that is there but untrusted; keeps a valid one another run stored meanwhile.
        """
        src, final = Path(src), self.entry_dir(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        sweep_tmp(final.parent)
        tmp = final.parent / tmp_name(key[:16])
        try:
            files = {}
            for path in _files(src):
                rel = path.relative_to(src).as_posix()
                dst = tmp / OUT_DIR / rel
                _place(path, dst)
                _fsync(dst)  # the data is on disk before the rename makes the entry visible
                st = dst.stat()
                files[rel] = [st.st_size, st.st_mtime_ns]
            write_json(tmp / ENTRY_FILE, {"format": FORMAT, "stage": stage, "key": key, "meta": meta or {},
                                          "files": files}, default=str)
            self._install(tmp, final, stage, key)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        entry = self.lookup(stage, key)
        if entry is None:  # pragma: no cover - only if the folder is changed under us right now
            raise OSError(f"stage cache entry {final} could not be verified right after it was stored")
        return entry

    def discard(self, stage: str, key: str) -> None:
        """Remove an entry (its files stay in run folders that link to them)."""
        final = self.entry_dir(stage, key)
        if final.exists():
            trash = final.parent / tmp_name("trash")
            try:
                os.rename(final, trash)  # atomic: a reader sees the entry or nothing
            except OSError:
                return
            shutil.rmtree(trash, ignore_errors=True)

    def _install(self, tmp: Path, final: Path, stage: str, key: str) -> None:
        for _ in range(3):
            try:
                os.rename(tmp, final)
                return
            except OSError:
                if not final.exists():
                    raise
            if self.lookup(stage, key) is not None:
                return  # a concurrent run stored the same outputs first: keep theirs
            self.discard(stage, key)  # an untrusted leftover: replace it
        raise OSError(f"could not store stage cache entry {final}")

    def replace(self, stage: str, key: str, src: str | Path, meta: dict[str, Any] | None = None) -> Entry:
        """Like :meth:`store`, but the new outputs win over a valid entry (``--force``)."""
        self.discard(stage, key)
        return self.store(stage, key, src, meta)


def sweep_tmp(folder: Path) -> None:
    """Remove temporary folders left by runs killed while storing: this host's runs whose process is gone
    (elsewhere, and on Windows where a process cannot be probed safely, those a day old)."""
    for p in folder.glob(".tmp-*"):
        parts = p.name.rsplit("-", 3)
        try:
            stale = time.time() - p.stat().st_mtime > STALE_TMP_S
        except OSError:
            continue
        if not stale and os.name != "nt" and len(parts) == 4 and parts[1] == _host() and parts[2].isdigit():
            pid = int(parts[2])
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)  # signal 0: is it alive? (POSIX only; on Windows os.kill terminates)
            except ProcessLookupError:
                stale = True
            except OSError:  # alive, another user's process
                pass
        if stale:
            shutil.rmtree(p, ignore_errors=True)
