"""The item shelf: the features of single images or texts, one shelf per encoder setting, keyed by content.

An item key is 32 bytes, the sha256 of what the features are computed from (an image's bytes, a text's UTF-8);
the shelf's folder says what computes them (``crossmodal.features.extract`` names it). A shelf only grows: each
write adds one chunk of items, two files named by the sha256 of the chunk's item keys,

- ``<name>.npy``: float32 (n, dim), row i the features of item i;
- ``<name>.keys``: the n item keys, 32 raw bytes each, in row order (written second: a chunk without it is unseen),

both written atomically, so a reader sees a chunk whole or not at all, and two runs that write the same items agree
on the name and the content. Opening a shelf reads every ``.keys`` file into one sorted index (32-byte keys in
numpy arrays, searched with ``searchsorted`` on their first 8 bytes); a chunk whose files do not match (damaged,
half-written by a run killed between its two files) is skipped, so its items are encoded again. Where two chunks
hold the same item (two runs encoded it at once, or ``--force`` replaced it), the newest chunk wins.

Several processes, on several machines sharing the folder, may write one shelf at once: two writers of the same
items write the same names (the last rename wins, whole either way), and a chunk is written under a temporary name
that carries the writer's host and pid, so the sweep of leftovers at open removes only the temporary files of dead
writers on this host (another host's pids mean nothing here: its leftovers go once ``FOREIGN_TMP_SECONDS`` old).

Usage::

    from crossmodal.features.shelf import Shelf, text_keys
    shelf = Shelf.open(".cache/crossmodal/text/items/3f2a...")
    keys = text_keys(["a red bus", "two cats"])        # uint8 (2, 32)
    chunk, row = shelf.find(keys)                       # -1 where the shelf lacks the item
    shelf.add(keys, features)                           # a new chunk; returns its number
    shelf.rows(chunk[0])[row[0]]                        # the first item's features (memory-mapped)
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import mmap
import os
import re
import time
from pathlib import Path

import numpy as np

from crossmodal.files import HOST, atomic_path, write_bytes

log = logging.getLogger(__name__)

KEY_BYTES = 32
SHELF_FILE = "shelf.json"  # what computes the shelf's features, for people (the index never reads it)
OPEN_CHUNKS = 128  # chunks kept mapped while reading: each mapping holds a file descriptor
# A temporary file of another host is swept once this old: no chunk takes that long to write, and its pid cannot
# be checked from here.
FOREIGN_TMP_SECONDS = 24 * 3600


class ChunkGone(OSError):
    """A chunk in the shelf's index vanished from disk (``--force`` replaced it, or the cache was cleaned)."""


# --------------------------------------------------------------------------- item keys
def text_keys(texts: list[str]) -> np.ndarray:
    """uint8 (n, 32): the sha256 of each text's UTF-8 bytes."""
    return _as_keys(b"".join(hashlib.sha256(t.encode("utf-8", "surrogatepass")).digest() for t in texts), len(texts))


def hex_keys(hexes: list[str]) -> np.ndarray:
    """uint8 (n, 32) from sha256 hex digests (an image's ``image_sha256``)."""
    return _as_keys(b"".join(bytes.fromhex(h) for h in hexes), len(hexes))


def _as_keys(raw: bytes, n: int) -> np.ndarray:
    return np.frombuffer(raw, dtype=np.uint8).reshape(n, KEY_BYTES)


def _prefix(keys: np.ndarray) -> np.ndarray:
    """The first 8 bytes of each key as an integer, big-endian: sorting these sorts the keys by their first bytes."""
    return np.ascontiguousarray(keys[:, :8]).view(">u8").ravel().astype(np.uint64)


def distinct(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(first, code)``: the row of each distinct key's first occurrence, ascending, and each row's distinct number.

    Sorting 8-byte prefixes is several times faster than sorting 32-byte keys; two distinct keys sharing a prefix
    (about one in 10^12 pairs) are detected and then sorted whole.
    """
    if len(keys) == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(_prefix(keys), return_index=True, return_inverse=True)
    inverse = inverse.ravel()
    if not np.array_equal(keys, keys[first][inverse]):
        _, first, inverse = np.unique(keys.view(f"V{KEY_BYTES}").ravel(), return_index=True, return_inverse=True)
        inverse = inverse.ravel()
    order = np.argsort(first, kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return first[order].astype(np.int64), rank[inverse]


# --------------------------------------------------------------------------- files
def write_chunk(path: Path, arr: np.ndarray) -> None:
    """One chunk's features, atomically: a killed run leaves either the whole file or none of it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a handle: given a name, np.save appends ".npy"
        np.save(fh, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)


def npy_shape(path: Path) -> tuple[int, ...] | None:
    """Shape of a whole float32 .npy file, from its header and size; None if absent, damaged or of another type."""
    header = _npy_header(path)
    return None if header is None else header[0]


def _npy_header(path: Path) -> tuple[tuple[int, ...], int] | None:
    """``(shape, offset of the data)`` of a whole float32 .npy file; None if absent, damaged or of another type."""
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            if version not in ((1, 0), (2, 0)):  # np.save writes 1.0 (2.0 for huge headers); 3.0 is never ours
                raise ValueError(f"npy format {version}")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(fh)
            data_at = fh.tell()
            size = os.fstat(fh.fileno()).st_size
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable feature file %s (%s); recomputing it", path, err)
        return None
    if dtype != np.float32 or fortran or size != data_at + 4 * int(np.prod(shape, dtype=np.int64)):
        log.warning("ignoring feature file %s: not a whole float32 array; recomputing it", path)
        return None
    return tuple(int(s) for s in shape), data_at


_TMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{12}\.tmp$")  # crossmodal.files's temporary names carry the writer's pid
_HOST_TMP = re.compile(r"^\..+\.@([A-Za-z0-9-]+)\.(\d+)\.[0-9a-f]{12}\.tmp$")  # with the writer's host, too


def sweep_stale_tmp(folder: Path) -> None:
    """Remove temporary files left in ``folder`` by writers that no longer run (a killed extraction)."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        tagged = _HOST_TMP.match(p.name)
        if tagged and tagged[1] != HOST:
            try:
                if time.time() - p.stat().st_mtime > FOREIGN_TMP_SECONDS:
                    p.unlink(missing_ok=True)
            except FileNotFoundError:  # renamed into place or swept meanwhile
                pass
            continue
        m = _TMP.match(p.name)
        if not m or int(m[1]) == os.getpid():
            continue
        try:
            os.kill(int(m[1]), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's process
            pass


# --------------------------------------------------------------------------- the shelf
class Shelf:
    """One shelf folder: its index of item keys, and the chunks they point into."""

    def __init__(self, root: Path, names: list[str], keys: list[np.ndarray], offsets: list[int], dim: int | None):
        self.root = root
        self.names = list(names)  # chunk number -> file name stem, newest first at open time
        self.dim = dim
        self._offsets = list(offsets)  # where each chunk's data starts in its .npy
        self._counts = counts = [len(k) for k in keys]
        all_keys = np.concatenate(keys) if keys else np.zeros((0, KEY_BYTES), dtype=np.uint8)
        chunk = np.repeat(np.arange(len(keys), dtype=np.int32), counts)
        row = np.concatenate([np.arange(c, dtype=np.int32) for c in counts]) if keys else np.zeros(0, np.int32)
        # Stable: among equal keys the newest chunk (the lowest number) comes first, and find() takes the first.
        prefix = _prefix(all_keys)
        order = np.argsort(prefix, kind="stable")
        self._keys, self._prefix = all_keys[order], prefix[order]
        self._chunk, self._row = chunk[order], row[order]
        self._open: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, root: str | Path) -> Shelf:
        """Read the shelf's index (an absent folder is an empty shelf); leftover temporary files are removed."""
        root = Path(root)
        sweep_stale_tmp(root)
        found = []
        for keys_file in root.glob("*.keys") if root.is_dir() else ():
            try:
                raw, mtime = keys_file.read_bytes(), keys_file.stat().st_mtime_ns
            except FileNotFoundError:  # replaced by --force meanwhile
                continue
            name = keys_file.stem
            if not raw or len(raw) % KEY_BYTES or hashlib.sha256(raw).hexdigest() != name:
                log.warning("ignoring damaged chunk keys %s; its items are encoded again", keys_file)
                continue
            found.append((mtime, name, raw))
        found.sort(key=lambda f: (-f[0], f[1]))  # newest first
        names, keys, offsets, dim = [], [], [], None
        for _, name, raw in found:
            header = _npy_header(root / f"{name}.npy")
            shape = None if header is None else header[0]
            n = len(raw) // KEY_BYTES
            if shape is None or len(shape) != 2 or shape[0] != n or dim not in (None, shape[1]):
                if shape is not None:
                    log.warning("ignoring chunk %s: shape %s, expected (%d, %s)", root / f"{name}.npy", shape, n,
                                dim if dim is not None else "dim")
                continue
            dim = shape[1]
            names.append(name)
            keys.append(_as_keys(raw, n))
            offsets.append(header[1])
        return cls(root, names, keys, offsets, dim)

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(chunk, row)`` of each key (int32 arrays), -1 where the shelf lacks it."""
        chunk = np.full(len(keys), -1, dtype=np.int32)
        row = np.full(len(keys), -1, dtype=np.int32)
        m = len(self._keys)
        if m == 0 or len(keys) == 0:
            return chunk, row
        want = _prefix(keys)
        pos = np.searchsorted(self._prefix, want)
        at = np.minimum(pos, m - 1)
        same_prefix = self._prefix[at] == want
        hit = same_prefix & (self._keys[at] == keys).all(axis=1)
        chunk[hit], row[hit] = self._chunk[at[hit]], self._row[at[hit]]
        for i in np.flatnonzero(same_prefix & ~hit):  # another key shares the prefix: look further along
            j = pos[i] + 1
            while j < m and self._prefix[j] == want[i]:
                if np.array_equal(self._keys[j], keys[i]):
                    chunk[i], row[i] = self._chunk[j], self._row[j]
                    break
                j += 1
        return chunk, row

    def add(self, keys: np.ndarray, features: np.ndarray) -> int:
        """Write one chunk (the features first, then the keys that make it visible); returns its chunk number.

        The index is not updated: the caller knows where the items went (chunk number, row = position).
        """
        keys = np.ascontiguousarray(keys, dtype=np.uint8)
        if features.ndim != 2 or len(features) != len(keys) or len(keys) == 0:
            raise ValueError(f"a chunk needs one feature row per key, got {features.shape} for {len(keys)} keys")
        if self.dim is not None and features.shape[1] != self.dim:
            raise ValueError(f"{self.root}: features of width {features.shape[1]}, the shelf holds {self.dim}")
        raw = keys.tobytes()
        name = hashlib.sha256(raw).hexdigest()
        write_chunk(self.root / f"{name}.npy", features)
        write_bytes(self.root / f"{name}.keys", raw)
        self.dim = int(features.shape[1])
        self.names.append(name)
        self._counts.append(len(keys))
        self._offsets.append(_npy_header(self.root / f"{name}.npy")[1])
        return len(self.names) - 1

    def rows(self, chunk: int) -> np.ndarray:
        """Chunk ``chunk``'s features, memory-mapped; ``ChunkGone`` if it was deleted since the shelf was opened.

        Mapped at the data offset found at open (np.load would parse the header on every call). The first
        ``OPEN_CHUNKS`` chunks read stay mapped, later ones are mapped per call: a shuffled table reads every chunk
        for every block of rows, a cyclic pattern under which a least-recently-used cache would never hit.
        """
        arr = self._open.get(chunk)
        if arr is not None:
            return arr
        path = os.path.join(self.root, f"{self.names[chunk]}.npy")
        n = self._counts[chunk]
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
            finally:
                os.close(fd)
            arr = np.frombuffer(mapped, np.float32, n * self.dim, self._offsets[chunk]).reshape(n, self.dim)
        except FileNotFoundError:
            raise ChunkGone(errno.ENOENT, "feature chunk removed while reading it", path) from None
        except ValueError:  # shorter than at open: replaced by another file meanwhile
            raise ChunkGone(errno.ESTALE, "feature chunk changed while reading it", path) from None
        if len(self._open) < OPEN_CHUNKS:
            self._open[chunk] = arr
        return arr

    def close(self) -> None:
        self._open.clear()

    def describe(self, meta: dict) -> None:
        """Write ``shelf.json`` (what computes these features, and their width) unless it is there already."""
        path = self.root / SHELF_FILE
        if not path.is_file():
            write_bytes(path, (json.dumps({**meta, "dim": self.dim}, indent=2, sort_keys=True) + "\n").encode())

    def chunk_keys(self, chunk: int) -> np.ndarray:
        """uint8 (n, 32): the item keys of chunk ``chunk``, in row order (read from its keys file)."""
        return _as_keys((self.root / f"{self.names[chunk]}.keys").read_bytes(), -1)


def replace_shelf(src: Path, dst: Path) -> int:
    """Move every chunk of shelf ``src`` into shelf ``dst``, where they then win over the items already there.

    ``--force`` encodes into a private shelf and moves it here: each chunk's two files are renamed in (features,
    then keys), so a reader sees the old chunk or the new one; a chunk of ``dst`` whose items all came anew is then
    removed (keys first), since it would never be read again. Returns the number of chunks moved.
    """
    new = Shelf.open(src)
    dst.mkdir(parents=True, exist_ok=True)
    for name in reversed(new.names):  # oldest first: the newest of them stays the newest
        os.replace(src / f"{name}.npy", dst / f"{name}.npy")
        os.replace(src / f"{name}.keys", dst / f"{name}.keys")
    if (src / SHELF_FILE).is_file() and not (dst / SHELF_FILE).is_file():
        os.replace(src / SHELF_FILE, dst / SHELF_FILE)
    moved = set(new.names)
    old = Shelf.open(dst)
    for i, name in enumerate(old.names):
        if name in moved:
            continue
        try:
            keys = old.chunk_keys(i)
        except FileNotFoundError:
            continue
        if (new.find(keys)[0] >= 0).all():
            (dst / f"{name}.keys").unlink(missing_ok=True)
            (dst / f"{name}.npy").unlink(missing_ok=True)
    return len(moved)
