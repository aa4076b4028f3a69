"""The feature store: image and text features for every validated row, content-addressed on disk.

A second run with nothing changed reads the cache and never loads an encoder. The encoders themselves (device,
precision, batching) are ``crossmodal.features.extractor``.

Usage::

    from crossmodal.config import EncodersConfig
    from crossmodal.features.extract import extract_features
    res = extract_features("work/validated/validated.parquet", EncodersConfig(), ".cache/crossmodal")
    res.image_path, res.text_path, res.computed        # .npy files in validated.parquet row order

Keys: the image key hashes the ordered ``image_sha256`` list, the text key the ordered texts, each with its
encoder name, parameters and precision, so image and text are cached separately. Files:
``<cache>/<kind>/<key>.npy`` (float32, one row per validated row) with ``<key>.json``; while computing,
atomic chunk files of ``CHUNK_ROWS`` distinct inputs under ``<key>.parts/``, so memory stays flat and a killed
run resumes from the chunks on disk. A row whose image (or text) is absent gets an all-NaN row in that array.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crossmodal.artifacts import FEATURES_FILE, IMAGE_FEATURES_FILE, TEXT_FEATURES_FILE
from crossmodal.config import EncodersConfig
from crossmodal.data.validated import read_validated
from crossmodal.encoders.registry import canonical_name
from crossmodal.errors import FeatureError
from crossmodal.features.extractor import FeatureExtractor
from crossmodal.files import atomic_path, write_json
from crossmodal.hardware import precision_name, resolve_device, resolve_precision

log = logging.getLogger(__name__)

# Bump when preprocessing or pooling changes in a way that changes features: old cache entries then miss.
FEATURE_VERSION = 1
# How images become features (resize in crossmodal.data.images.image_to_tensor, the encoder graph in
# crossmodal.features.extractor.FeatureExtractor.image_module): features from an earlier pipeline differ by
# rounding, so they are not mixed with new ones.
IMAGE_PIPELINE = 2
REQUIRED_COLUMNS = ("id", "image", "text", "image_sha256")
# Distinct inputs per chunk file: one chunk is the most work a killed run loses.
CHUNK_ROWS = 512
ASSEMBLE_ROWS = 8192  # rows per block when the chunks are streamed into the final .npy
MISSING = "\x00missing"  # stands for an absent image/text in the content key (no sha256 or text looks like it)


# --------------------------------------------------------------------------- the feature store
@dataclass
class FeatureResult:
    image_path: Path  # (N, image_dim) float32 .npy, rows in validated.parquet order
    text_path: Path
    image_key: str
    text_key: str
    computed: dict[str, bool]  # False: served from the cache
    rows: int
    image_dim: int
    text_dim: int
    image_encoder: str
    text_encoder: str
    precision: str
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_path"], d["text_path"] = str(self.image_path), str(self.text_path)
        return d


def _missing(values) -> np.ndarray:
    """True where a cell is null or empty (whitespace only counts as empty)."""
    import pandas as pd

    s = pd.Series(values)
    return (s.isna() | (s.astype(str).str.strip() == "")).to_numpy()


def _read_validated(path: str | Path):
    df = read_validated(path, REQUIRED_COLUMNS, FeatureError)
    if df.empty:
        raise FeatureError(f"{path} has no rows: nothing to extract (see the quarantine table next to it)")
    # An absent image is allowed (a NaN row); an image without its content hash means the table is not ours.
    bad = ~_missing(df["image"]) & _missing(df["image_sha256"])
    if bad.any():
        raise FeatureError(f"{path}: column 'image_sha256' is empty in row id {df['id'][bad].iloc[0]!r}; "
                           "re-run validate")
    return df


def _items(df, kind: str) -> list:
    """What one row's features are computed from: its image hash or its text; ``MISSING`` where absent."""
    column = "image_sha256" if kind == "image" else "text"
    absent = _missing(df["image"] if kind == "image" else df["text"])
    return [MISSING if a else v for a, v in zip(absent, df[column].tolist(), strict=True)]


def _key(kind: str, items, encoder: str, params: dict, precision: str) -> str:
    """sha256 over a header (what computes the features) and the ordered items (what they are computed from)."""
    h = hashlib.sha256()
    header = {"v": FEATURE_VERSION, "kind": kind, "encoder": encoder, "params": params, "precision": precision}
    h.update(json.dumps(header, sort_keys=True).encode())
    for item in items:
        b = str(item).encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))  # length-prefixed: no two lists hash alike by concatenation
        h.update(b)
    return h.hexdigest()


def feature_keys(df, cfg: EncodersConfig, precision: str) -> dict[str, str]:
    return {
        "image": _key("image", _items(df, "image"), canonical_name(cfg.image.name),
                      {"image_size": cfg.image.image_size, "pipeline": IMAGE_PIPELINE}, precision),
        "text": _key("text", _items(df, "text"), canonical_name(cfg.text.name),
                     {"max_length": cfg.text.max_length}, precision),
    }


def _cache_file(cache_dir: str | Path, kind: str, key: str) -> Path:
    return Path(cache_dir) / kind / f"{key}.npy"


def _parts_dir(final: Path) -> Path:
    return final.with_suffix(".parts")


def _npy_shape(path: Path) -> tuple[int, ...] | None:
    """Shape of a float32 .npy file from its header, or None if the file is absent or not such a file."""
    try:
        arr = np.load(path, mmap_mode="r")  # reads the header only
    except (OSError, ValueError) as err:
        if path.exists():
            log.warning("ignoring unreadable feature file %s (%s); recomputing it", path, err)
        return None
    return arr.shape if arr.dtype == np.float32 else None


def _is_cached(path: Path, rows: int) -> bool:
    shape = _npy_shape(path)
    return shape is not None and len(shape) == 2 and shape[0] == rows


def write_chunk(path: Path, arr: np.ndarray) -> None:
    """One chunk file, atomically: a killed run leaves either the whole chunk or none of it."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a handle: given a name, np.save appends ".npy"
        np.save(fh, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)


_TMP = re.compile(r"^\..+\.(\d+)\.[0-9a-f]{12}\.tmp$")  # crossmodal.files's temporary names carry the writer's pid


def _sweep_stale_tmp(folder: Path) -> None:
    """Remove temporary files left by writers that no longer run (a killed extraction)."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        m = _TMP.match(p.name)
        if not m or int(m[1]) == os.getpid():
            continue
        try:
            os.kill(int(m[1]), 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
        except PermissionError:  # alive, another user's process
            pass


def _disk_error(err: OSError, cache_dir: Path, what: str) -> FeatureError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return FeatureError(
            f"no space left to write {what} into the feature cache {cache_dir} ({os.strerror(err.errno)}); "
            "free some space there or set paths.cache to a folder on a larger disk, then run again: "
            "the chunks already written are kept and extraction resumes from them"
        )
    return FeatureError(f"cannot write {what} into the feature cache {cache_dir} ({err}); "
                        "check that the folder is writable or set paths.cache to another folder")


def extract_features(
    validated_path: str | Path,
    cfg: EncodersConfig,
    cache_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    extractor: FeatureExtractor | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> FeatureResult:
    """Image and text features for every row of ``validated.parquet``, from the cache when possible.

    Identical images (same sha256) and identical texts are encoded once; absent ones become NaN rows. With
    ``out_dir`` the arrays are also copied to out_dir/image.npy and out_dir/text.npy with out_dir/features.json
    (for DVC), and the result's paths point there; otherwise they point into the cache. ``extractor`` (built
    with this same ``cfg``) lends its already-loaded encoders, e.g. to a long-lived worker; by default encoders
    are loaded only if something must be computed.
    """
    if extractor is not None and extractor.cfg != cfg:
        raise ValueError("extract_features: the extractor was built with another EncodersConfig than cfg")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    df = _read_validated(validated_path)
    cache_dir = Path(cache_dir)
    fx = extractor  # created only if something must be computed
    device = resolve_device(cfg.device)
    precision = precision_name(resolve_precision(cfg.precision, device))
    keys = feature_keys(df, cfg, precision)
    paths, computed, seconds, dims = {}, {}, {}, {}
    for kind in ("image", "text"):
        path = paths[kind] = _cache_file(cache_dir, kind, keys[kind])
        computed[kind] = not _is_cached(path, len(df))
        if computed[kind]:
            t0 = time.perf_counter()
            fx = fx or FeatureExtractor(cfg)
            try:
                _sweep_stale_tmp(path.parent)
                dims[kind] = _compute(fx, kind, df, path, chunk_rows, progress, validated_path)
                seconds[kind] = round(time.perf_counter() - t0, 3)
                write_json(path.with_suffix(".json"), sort_keys=True, obj={
                    "key": keys[kind], "kind": kind, "rows": len(df), "dim": dims[kind], "precision": precision,
                    "encoder": getattr(cfg, kind).name,
                    "params": getattr(cfg, kind).model_dump(exclude={"batch_size"}),
                    "seconds": seconds[kind], "device": str(fx.device), "source": str(Path(validated_path).resolve()),
                })
            except OSError as err:
                if not _is_cached(path, len(df)):
                    raise _disk_error(err, cache_dir, f"{kind} features") from None
                # Another run computed the same features meanwhile and removed the chunks we were reading.
                dims[kind], seconds[kind] = int(_npy_shape(path)[1]), round(time.perf_counter() - t0, 3)
            log.info("%s features: computed (%d, %d) in %.1f s -> %s", kind, len(df), dims[kind], seconds[kind], path)
        else:
            log.info("%s features: cache hit %s", kind, path)
            dims[kind] = int(_npy_shape(path)[1])
            if _parts_dir(path).exists():  # a run killed between assembling and cleaning up
                shutil.rmtree(_parts_dir(path), ignore_errors=True)

    result = FeatureResult(paths["image"], paths["text"], keys["image"], keys["text"], computed, len(df),
                           dims["image"], dims["text"], cfg.image.name, cfg.text.name, precision, seconds)
    if out_dir is not None:
        out = Path(out_dir)
        for kind in ("image", "text"):
            # A copy, not a link: DVC tracks out_dir and may move it into its own cache. Streamed, not read whole.
            with atomic_path(out / f"{kind}.npy") as tmp:
                shutil.copyfile(paths[kind], tmp)
        result.image_path, result.text_path = (out / IMAGE_FEATURES_FILE).resolve(), (out / TEXT_FEATURES_FILE).resolve()
        # Only what the arrays depend on (no timings, no absolute paths): same inputs, same bytes for DVC.
        write_json(out / FEATURES_FILE, sort_keys=True, obj={
            "image_key": result.image_key, "text_key": result.text_key, "rows": len(df),
            "shapes": {"image": [len(df), dims["image"]], "text": [len(df), dims["text"]]},
            "image_encoder": cfg.image.name, "text_encoder": cfg.text.name, "precision": precision,
            "image_size": cfg.image.image_size, "max_length": cfg.text.max_length,
        })
    return result


def _compute(fx: FeatureExtractor, kind: str, df, final: Path, chunk_rows: int, progress: bool, source) -> int:
    """Encode what the finished chunks lack, then assemble ``final``; returns the feature dimension."""
    import pandas as pd

    # Each distinct image (by content) / text is encoded once, in order of first appearance; -1 = absent.
    items = _items(df, kind)
    codes, _ = pd.factorize(pd.Series([None if it == MISSING else it for it in items], dtype=object))
    codes = np.asarray(codes, dtype=np.int64)
    _, first = np.unique(codes[codes >= 0], return_index=True)
    first = np.flatnonzero(codes >= 0)[first]  # row of the first occurrence of each code, in code order
    n_uniq = len(first)
    parts = _parts_dir(final)
    _sweep_stale_tmp(parts)
    bounds = [(s, min(s + chunk_rows, n_uniq)) for s in range(0, n_uniq, chunk_rows)]
    chunk_files = [parts / f"{i:06d}.npy" for i in range(len(bounds))]
    dim = None
    todo = []
    for (s, e), f in zip(bounds, chunk_files, strict=True):
        shape = _npy_shape(f)
        if shape is not None and len(shape) == 2 and shape[0] == e - s and dim in (None, shape[1]):
            dim = shape[1]
        else:
            todo.append((s, e, f))
    if todo:
        log.info("%s features: %d of %d chunks on disk, computing %d (%d distinct inputs)", kind,
                 len(bounds) - len(todo), len(bounds), len(todo), sum(e - s for s, e, _ in todo))
        dim = _encode_chunks(fx, kind, df, first, todo, progress, source)
    if dim is None:  # nothing to encode (every row lacks this modality): only the width is needed
        dim = fx.image_dim if kind == "image" else fx.text_dim
    _assemble(final, codes, chunk_files, chunk_rows, dim)
    shutil.rmtree(parts, ignore_errors=True)
    return int(dim)


def _encode_chunks(fx: FeatureExtractor, kind: str, df, first: np.ndarray, todo: list, progress: bool,
                   source) -> int:
    """Encode the distinct inputs of the ``todo`` chunks in one pass, writing each chunk as soon as it is full."""
    from crossmodal.data.images import ImageError

    rows = np.concatenate([first[s:e] for s, e, _ in todo])
    sizes = [e - s for s, e, _ in todo]
    buf: list[np.ndarray] = []
    have, k, dim = 0, 0, 0

    def take(feats: np.ndarray) -> None:
        nonlocal have, k, dim
        buf.append(feats)
        have += len(feats)
        dim = feats.shape[1]
        while k < len(sizes) and have >= sizes[k]:
            block = np.concatenate(buf) if len(buf) > 1 else buf[0]
            write_chunk(todo[k][2], block[: sizes[k]])
            rest = block[sizes[k]:]
            buf[:] = [rest] if len(rest) else []
            have -= sizes[k]
            k += 1

    if kind == "image":
        sources = df["image"].to_numpy()[rows].tolist()
        ids = df["id"].to_numpy()[rows]
        names = [f"row id {i!r}" for i in ids]
        try:
            for feats in fx.iter_image_features(sources, progress=progress, names=names):
                take(feats)
        except ImageError as err:  # validation decoded it, so the file changed or vanished since
            raise FeatureError(f"{source}: {err}; re-run `crossmodal validate` to quarantine it") from None
    else:
        texts = df["text"].to_numpy()[rows].tolist()
        for feats in fx.iter_text_features(texts, progress=progress, chunk=max(sizes)):
            take(feats)
    if k != len(sizes):  # an extractor bug, not a user error
        raise RuntimeError(f"{kind} features: {have} rows left over after {k} of {len(sizes)} chunks")
    return dim


def _assemble(final: Path, codes: np.ndarray, chunk_files: list[Path], chunk_rows: int, dim: int) -> None:
    """Stream the chunks into ``final`` (N, dim) in row order, one block of rows at a time (NaN where absent).

    Rows mostly follow the chunks (codes are numbered by first appearance), so a block of rows reads one or two
    chunks; the chunk files are memory-mapped only for the block that needs them, so memory stays flat.
    """
    n = len(codes)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": (n, dim)}
    with atomic_path(final) as tmp, open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for r0 in range(0, n, ASSEMBLE_ROWS):
            c = codes[r0 : r0 + ASSEMBLE_ROWS]
            block = np.full((len(c), dim), np.nan, dtype=np.float32)
            present = c >= 0
            which = c // chunk_rows
            for ch in np.unique(which[present]):
                sel = present & (which == ch)
                part = np.load(chunk_files[ch], mmap_mode="r")
                block[sel] = part[c[sel] - ch * chunk_rows]
                del part
            fh.write(block.tobytes())
