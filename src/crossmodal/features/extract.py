"""The feature store: image and text features for every validated row, content-addressed per item on disk.

Only the items (images by their bytes, texts) the store has not seen are encoded: a grown table encodes its new
rows only, a reordered or shrunk one encodes nothing, and an unchanged one reads one file per modality without
loading an encoder. The encoders (device, precision, batching) are ``crossmodal.features.extractor``; the per-item
chunks on disk are ``crossmodal.features.shelf``.

Usage::

    from crossmodal.config import EncodersConfig
    from crossmodal.features.extract import extract_features
    res = extract_features("work/validated/validated.parquet", EncodersConfig(), ".cache/crossmodal")
    res.image_path, res.text_path      # .npy files in validated.parquet row order
    res.encoded, res.reused            # e.g. {"image": 100, "text": 98}, {"image": 1000, "text": 990}
    res.computed                       # {"image": True, "text": True}; False where served whole from the cache

The store, per kind (``image``, ``text``) under the cache folder:

- ``<kind>/items/<shelf key>/``: the shelf, features of single items keyed by the sha256 of the image's bytes
  (the table's ``image_sha256``) or of the text's UTF-8, in atomic chunks of ``CHUNK_ROWS`` distinct items (a killed
  run resumes from the chunks it finished). The shelf key hashes what computes the features: kind, canonical
  encoder name, ``image_size`` and ``IMAGE_PIPELINE`` (images) or ``max_length`` (texts), precision and
  ``FEATURE_VERSION``.
- ``<kind>/<key>.npy`` with ``<key>.json``: the assembled float32 (N, dim) array, one row per validated row, streamed
  from the shelf in blocks of ``ASSEMBLE_ROWS`` rows (memory stays flat). ``key`` (``FeatureResult.image_key`` /
  ``text_key``) hashes the shelf's settings and the ordered item list, so an unchanged table finds its array here.

Counts, per kind, of distinct present items (identical images or texts count once; an absent one gets an all-NaN
row, is never encoded and is not counted): ``encoded`` were computed by this call, ``reused`` were found in the
shelf, and ``encoded + reused`` is the number of distinct present items. When the assembled array is served whole
from the cache, every item is ``reused`` and ``computed`` is False.

Shards: processes on a cluster (several machines sharing the cache folder) fill one store at the same time.
``plan_shards`` cuts each kind's distinct items, in the order ``extract_features`` encodes them, into ranges that
hold something the shelf lacks; ``encode_shard`` encodes one range's missing items into the shelf (in chunks, so a
killed shard resumes; two shards, or one run twice at once, may write the same shelf); ``extract_features`` then
finds every item and only assembles. Features match one unsharded call to float rounding: a text's features depend
slightly on the texts that share its batch (sorted by length within a chunk, padded to the longest). With
``shard_items`` a multiple of ``chunk_rows`` (and of the batch sizes) the shards of a fresh store encode the chunks,
hence the batches, of one call: the same bits. Each machine resolves ``precision: auto`` (part of the shelf's key)
for its own device: planning, shards and assembly meet in one shelf across CPUs and GPUs only with a set precision::

    shards = plan_shards(validated, cfg, cache, shard_items=2048)   # [{"kind": "image", "start": 0, ...}, ...]
    done = [encode_shard(validated, cfg, cache, s["kind"], s["start"], s["stop"]) for s in shards]  # anywhere
    res = extract_features(validated, cfg, cache)                    # encodes nothing, assembles

Augmented views (``train.augment`` with ``frozen: true``; ``crossmodal.data.augment``): ``extract_views`` encodes
K views of each training row's image and text into the same shelves, for the frozen-feature heads to train on::

    views = extract_views(validated, cfg, AugmentConfig(views=2, frozen=True), cache)
    views.image_path, views.text_path   # float32 (K, n_train, dim) .npy: view k of the train rows, in table order

An image view is keyed by the sha256 of (the image augmentation settings and seed, the view number, the image's
sha256); a text view by its augmented text itself, as any text (identical strings have identical features). The
assembled ``<kind>/views-<key>.npy`` is keyed by the shelf's settings, the augmentation settings and the ordered
training items, so an unchanged table and setting reads it without loading an encoder. Validation and test rows
get no views.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import numbers
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crossmodal.artifacts import FEATURES_FILE, IMAGE_FEATURES_FILE, TEXT_FEATURES_FILE
from crossmodal.config import AugmentConfig, EncodersConfig
from crossmodal.data.validated import read_validated
from crossmodal.encoders.registry import canonical_name
from crossmodal.errors import ConfigError, FeatureError
from crossmodal.features.extractor import FeatureExtractor
from crossmodal.features.shelf import (
    ChunkGone,
    Shelf,
    distinct,
    hex_keys,
    npy_shape,
    replace_shelf,
    sweep_stale_tmp,
    text_keys,
)
from crossmodal.files import atomic_path, write_json
from crossmodal.hardware import cpu_threads, precision_name, resolve_device, resolve_precision

log = logging.getLogger(__name__)

# Bump when preprocessing or pooling changes in a way that changes features: old cache entries then miss.
FEATURE_VERSION = 1
# How images become features (resize in crossmodal.data.images.image_to_tensor, the encoder graph in
# crossmodal.features.extractor.FeatureExtractor.image_module): features from an earlier pipeline differ by
# rounding, so they are not mixed with new ones.
IMAGE_PIPELINE = 2
REQUIRED_COLUMNS = ("id", "image", "text", "image_sha256")
KINDS = ("image", "text")
ITEMS_DIR = "items"  # <cache>/<kind>/items/<shelf key>/: the shelves
# Distinct new items per chunk file: one chunk is the most work a killed run loses.
CHUNK_ROWS = 512
ASSEMBLE_ROWS = 8192  # rows per block when the shelf is streamed into the assembled .npy
MISSING = "\x00missing"  # stands for an absent image/text in the ordered key (no sha256 or text looks like it)


# --------------------------------------------------------------------------- the feature store
@dataclass
class FeatureResult:
    image_path: Path  # (N, image_dim) float32 .npy, rows in validated.parquet order
    text_path: Path
    image_key: str  # key of the assembled arrays (the ordered item list and the shelf's settings)
    text_key: str
    computed: dict[str, bool]  # False: the assembled array was served from the cache
    rows: int
    image_dim: int
    text_dim: int
    image_encoder: str
    text_encoder: str
    precision: str
    seconds: dict[str, float] = field(default_factory=dict)
    encoded: dict[str, int] = field(default_factory=dict)  # distinct present items encoded by this call
    reused: dict[str, int] = field(default_factory=dict)  # distinct present items found in the store

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
    present = ~_missing(df["image"])
    bad = present & ~df["image_sha256"].astype(str).str.fullmatch(r"[0-9a-fA-F]{64}").to_numpy(dtype=bool)
    if bad.any():
        raise FeatureError(f"{path}: column 'image_sha256' is empty or not a sha256 in row id "
                           f"{df['id'][bad].iloc[0]!r}; re-run validate")
    return df


def _items(df, kind: str) -> list:
    """What one row's features are computed from: its image hash or its text; ``MISSING`` where absent."""
    column = "image_sha256" if kind == "image" else "text"
    absent = _missing(df[kind])
    return [MISSING if a else v for a, v in zip(absent, df[column].tolist(), strict=True)]


def _headers(cfg: EncodersConfig, precision: str) -> dict[str, dict]:
    """What computes each kind's features: a shelf per header."""
    params = {"image": {"image_size": cfg.image.image_size, "pipeline": IMAGE_PIPELINE},
              "text": {"max_length": cfg.text.max_length}}
    return {kind: {"v": FEATURE_VERSION, "kind": kind, "encoder": canonical_name(getattr(cfg, kind).name),
                   "params": params[kind], "precision": precision} for kind in KINDS}


def _key(header: dict, items) -> str:
    """sha256 over a header (what computes the features) and the ordered items (what they are computed from)."""
    h = hashlib.sha256()
    h.update(json.dumps(header, sort_keys=True).encode())
    for item in items:
        b = str(item).encode("utf-8", "surrogatepass")
        h.update(len(b).to_bytes(8, "little"))  # length-prefixed: no two lists hash alike by concatenation
        h.update(b)
    return h.hexdigest()


def feature_keys(df, cfg: EncodersConfig, precision: str) -> dict[str, str]:
    """The keys of the assembled arrays of table ``df``: they change with the rows, their order and the settings."""
    return {kind: _key(header, _items(df, kind)) for kind, header in _headers(cfg, precision).items()}


def shelf_dirs(cache_dir: str | Path, cfg: EncodersConfig, precision: str) -> dict[str, Path]:
    """Each kind's shelf folder, ``<cache>/<kind>/items/<shelf key>``: one per encoder setting, whatever the table."""
    return {kind: Path(cache_dir) / kind / ITEMS_DIR / hashlib.sha256(json.dumps(header, sort_keys=True).encode())
            .hexdigest() for kind, header in _headers(cfg, precision).items()}


def _cache_file(cache_dir: str | Path, kind: str, key: str) -> Path:
    return Path(cache_dir) / kind / f"{key}.npy"


def _is_cached(path: Path, rows: int) -> bool:
    shape = npy_shape(path)
    return shape is not None and len(shape) == 2 and shape[0] == rows


def _drop_old_parts(final: Path) -> None:
    """Remove ``<key>.parts/``, the chunks an extraction of the earlier whole-table layout was killed with."""
    parts = final.with_suffix(".parts")
    if parts.is_dir():
        shutil.rmtree(parts, ignore_errors=True)


def _disk_error(err: OSError, cache_dir: Path, what: str) -> FeatureError:
    if isinstance(err, ChunkGone):
        return FeatureError(f"a feature chunk in {cache_dir} was removed while this run read it ({err.filename}); "
                            "run again (another run with --force may have replaced it)")
    if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return FeatureError(
            f"no space left to write {what} into the feature cache {cache_dir} ({os.strerror(err.errno)}); "
            "free some space there or set paths.cache to a folder on a larger disk, then run again: "
            "the chunks already written are kept and extraction resumes from them"
        )
    return FeatureError(f"cannot write {what} into the feature cache {cache_dir} ({err}); "
                        "check that the folder is writable or set paths.cache to another folder")


@dataclass
class _Items:
    """One kind's items of a table: each row's distinct item (-1: absent), and each distinct item's key and row."""

    codes: np.ndarray  # (N,) int64
    keys: np.ndarray  # (U, 32) uint8, in order of first appearance
    rows: np.ndarray  # (U,) the row of each distinct item's first appearance

    @classmethod
    def of(cls, df, kind: str) -> _Items:
        rows = np.flatnonzero(~_missing(df[kind]))
        values = df["image_sha256" if kind == "image" else "text"].to_numpy()[rows].tolist()
        keys = hex_keys(values) if kind == "image" else text_keys(values)
        first, code = distinct(keys)
        codes = np.full(len(df), -1, dtype=np.int64)
        codes[rows] = code
        return cls(codes, keys[first], rows[first])


def extract_features(
    validated_path: str | Path,
    cfg: EncodersConfig,
    cache_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    on_progress: Callable[[str, int, int], None] | None = None,
    extractor: FeatureExtractor | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> FeatureResult:
    """Image and text features for every row of ``validated.parquet``, encoding only what the store lacks.

    Identical images (same sha256) and identical texts are encoded once; absent ones become NaN rows. With
    ``out_dir`` the arrays are also copied to out_dir/image.npy and out_dir/text.npy with out_dir/features.json
    (for DVC), and the result's paths point there; otherwise they point into the cache. ``extractor`` (built
    with this same ``cfg``) lends its already-loaded encoders, e.g. to a long-lived worker; by default encoders
    are loaded only if something must be encoded. ``progress`` draws tqdm bars on stderr; ``on_progress(kind,
    done, total)`` hears, per kind, how many of the distinct present items are ready (found in the store or
    encoded), once when the kind starts and after each encoded batch.
    """
    _check_call("extract_features", cfg, extractor, chunk_rows)
    df = _read_validated(validated_path)
    cache_dir = Path(cache_dir)
    device = resolve_device(cfg.device)
    precision = _precision(cfg)
    keys, headers = feature_keys(df, cfg, precision), _headers(cfg, precision)
    shelves = shelf_dirs(cache_dir, cfg, precision)
    fx = [extractor]  # created only if something must be encoded

    def get_fx() -> FeatureExtractor:
        if fx[0] is None:
            fx[0] = FeatureExtractor(cfg)
        return fx[0]

    paths, computed, seconds, dims, encoded, reused = {}, {}, {}, {}, {}, {}
    for kind in KINDS:
        final = paths[kind] = _cache_file(cache_dir, kind, keys[kind])
        computed[kind] = not _is_cached(final, len(df))
        if computed[kind]:
            t0 = time.perf_counter()
            items = _Items.of(df, kind)
            counts = {"encoded": 0}
            try:
                sweep_stale_tmp(final.parent)
                dims[kind] = _extract(kind, df, items, final, shelves[kind], headers[kind], getattr(cfg, kind).name,
                                      get_fx, chunk_rows, counts, progress, validated_path, on_progress)
                seconds[kind] = round(time.perf_counter() - t0, 3)
                write_json(final.with_suffix(".json"), sort_keys=True, obj={
                    "key": keys[kind], "kind": kind, "rows": len(df), "dim": dims[kind], "precision": precision,
                    "encoder": getattr(cfg, kind).name, "shelf": shelves[kind].name,
                    "params": getattr(cfg, kind).model_dump(exclude={"batch_size"}),
                    "distinct": len(items.keys), "encoded": counts["encoded"],
                    "seconds": seconds[kind], "device": str(device), "source": str(Path(validated_path).resolve()),
                })
            except OSError as err:
                if not _is_cached(final, len(df)):
                    raise _disk_error(err, cache_dir, f"{kind} features") from None
                # Another run assembled the same array meanwhile (and --force may have replaced chunks we read).
                dims[kind], seconds[kind] = int(npy_shape(final)[1]), round(time.perf_counter() - t0, 3)
            encoded[kind], reused[kind] = counts["encoded"], len(items.keys) - counts["encoded"]
            log.info("%s features: (%d, %d), %d distinct items encoded, %d from the store, in %.1f s -> %s", kind,
                     len(df), dims[kind], encoded[kind], reused[kind], seconds[kind], final)
        else:
            dims[kind] = int(npy_shape(final)[1])
            encoded[kind], reused[kind] = 0, _distinct_count(final, df, kind)
            log.info("%s features: cache hit %s", kind, final)
            if on_progress is not None:
                on_progress(kind, reused[kind], reused[kind])
        _drop_old_parts(final)

    result = FeatureResult(paths["image"], paths["text"], keys["image"], keys["text"], computed, len(df),
                           dims["image"], dims["text"], cfg.image.name, cfg.text.name, precision, seconds,
                           encoded, reused)
    if out_dir is not None:
        out = Path(out_dir)
        for kind in KINDS:
            # A copy, not a link: DVC tracks out_dir and may move it into its own cache. Streamed, not read whole.
            with atomic_path(out / f"{kind}.npy") as tmp:
                shutil.copyfile(paths[kind], tmp)
        result.image_path, result.text_path = (out / IMAGE_FEATURES_FILE).resolve(), (out / TEXT_FEATURES_FILE).resolve()
        # Only what the arrays depend on (no timings, counts or absolute paths): same inputs, same bytes for DVC.
        write_json(out / FEATURES_FILE, sort_keys=True, obj={
            "image_key": result.image_key, "text_key": result.text_key, "rows": len(df),
            "shapes": {"image": [len(df), dims["image"]], "text": [len(df), dims["text"]]},
            "image_encoder": cfg.image.name, "text_encoder": cfg.text.name, "precision": precision,
            "image_size": cfg.image.image_size, "max_length": cfg.text.max_length,
        })
    return result


# --------------------------------------------------------------------------- augmented views
VIEWS_PREFIX = "views-"  # <cache>/<kind>/views-<key>.npy: the assembled views of a table's training rows


@dataclass
class ViewResult:
    image_path: Path  # float32 (views, train rows, image_dim) .npy
    text_path: Path
    views: int
    rows: int  # training rows, in validated.parquet order
    encoded: dict[str, int] = field(default_factory=dict)  # distinct views encoded by this call
    reused: dict[str, int] = field(default_factory=dict)  # distinct views found in the store
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["image_path"], d["text_path"] = str(self.image_path), str(self.text_path)
        return d


def _view_headers(cfg: EncodersConfig, augment: AugmentConfig, precision: str) -> dict[str, dict]:
    return {kind: {**header, "views": augment.views, "augment": getattr(augment, kind).model_dump(mode="json"),
                   "seed": augment.seed} for kind, header in _headers(cfg, precision).items()}


def view_keys(df, cfg: EncodersConfig, augment: AugmentConfig, precision: str) -> dict[str, str]:
    """The keys of the assembled views of table ``df``'s training rows (``extract_views``)."""
    train = df[df["split"].astype(str).to_numpy() == "train"]
    return {kind: _key(header, _items(train, kind)) for kind, header in _view_headers(cfg, augment,
                                                                                     precision).items()}


def extract_views(validated_path: str | Path, cfg: EncodersConfig, augment: AugmentConfig, cache_dir: str | Path, *,
                  extractor: FeatureExtractor | None = None, progress: bool = False) -> ViewResult:
    """Features of ``augment.views`` augmented views of each training row's image and text, from the store where it
    has them (see the module docstring); absent images or texts get NaN rows, as in ``extract_features``."""
    from crossmodal.data.augment import text_key, text_view, view_seed
    from crossmodal.data.text import clean_text

    if augment.views < 1:
        raise ValueError("extract_views: train.augment.views is 0 (augmentation is off)")
    _check_call("extract_views", cfg, extractor, CHUNK_ROWS)
    df = read_validated(validated_path, (*REQUIRED_COLUMNS, "split"), FeatureError)
    train = df[df["split"].astype(str).to_numpy() == "train"].reset_index(drop=True)
    cache_dir = Path(cache_dir)
    precision = _precision(cfg)
    keys, shelves = view_keys(df, cfg, augment, precision), shelf_dirs(cache_dir, cfg, precision)
    headers = _view_headers(cfg, augment, precision)
    fx = [extractor]

    def get_fx() -> FeatureExtractor:
        if fx[0] is None:
            fx[0] = FeatureExtractor(cfg)
        return fx[0]

    k, n = augment.views, len(train)
    paths, encoded, reused, seconds = {}, {}, {}, {}
    for kind in KINDS:
        final = paths[kind] = cache_dir / kind / f"{VIEWS_PREFIX}{keys[kind]}.npy"
        shape = npy_shape(final)
        if shape is not None and shape[:2] == (k, n):
            encoded[kind], reused[kind] = 0, k * n
            log.info("%s views: cache hit %s", kind, final)
            continue
        t0 = time.perf_counter()
        present = np.flatnonzero(~_missing(train[kind]))
        if kind == "image":
            settings = json.dumps({"augment": augment.image.model_dump(mode="json"), "seed": augment.seed},
                                  sort_keys=True).encode()
            shas = train["image_sha256"].to_numpy()[present].tolist()
            raw = b"".join(hashlib.sha256(b"view\x00" + settings + v.to_bytes(4, "little") + bytes.fromhex(h))
                           .digest() for v in range(1, k + 1) for h in shas)
            item_keys = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 32)
            sources = [(v, int(r)) for v in range(1, k + 1) for r in present]
        else:
            texts = [clean_text(t).encode("utf-8", "replace").decode("utf-8")
                     for t in train["text"].to_numpy()[present].tolist()]
            unk = getattr(get_fx().text_encoder.tokenizer, "unk_token", None) or "[UNK]"
            sources = [text_view(t, augment.text, view_seed(text_key(t), v, augment.seed), v, unk)
                       for v in range(1, k + 1) for t in texts]
            item_keys = text_keys(sources)
        first, code = distinct(item_keys)
        shelf = Shelf.open(shelves[kind])
        try:
            chunk, row = shelf.find(item_keys[first])
            todo = np.flatnonzero(chunk < 0)
            log.info("%s views: %d distinct, %d in the store, encoding %d", kind, len(first), len(first) - len(todo),
                     len(todo))
            for c0 in range(0, len(todo), CHUNK_ROWS):
                part = todo[c0 : c0 + CHUNK_ROWS]
                wanted = [sources[i] for i in first[part]]
                feats = (_image_view_features(get_fx(), train, wanted, augment, progress) if kind == "image"
                         else np.concatenate(list(get_fx().iter_text_features(wanted, progress=progress,
                                                                              chunk=len(wanted)))))
                chunk[part] = shelf.add(item_keys[first[part]], feats)
                row[part] = np.arange(len(part))
            dim = shelf.dim if shelf.dim is not None else (get_fx().image_dim if kind == "image"
                                                           else get_fx().text_dim)
            out = np.full((k * n, dim), np.nan, dtype=np.float32)
            at = (np.arange(k)[:, None] * n + present[None, :]).ravel()  # view-major, as the items were listed
            got = np.empty((len(first), dim), dtype=np.float32)
            for c in np.unique(chunk):
                sel = np.flatnonzero(chunk == c)
                got[sel] = shelf.rows(int(c))[row[sel]]
            out[at] = got[code]
            with atomic_path(final) as tmp, open(tmp, "wb") as fh:
                np.save(fh, out.reshape(k, n, dim), allow_pickle=False)
            if shelf.dim is not None:
                shelf.describe({**_headers(cfg, precision)[kind], "encoder_name": getattr(cfg, kind).name})
            write_json(final.with_suffix(".json"), sort_keys=True, obj={
                "key": keys[kind], "kind": kind, "views": k, "rows": n, "dim": int(dim), "header": headers[kind],
                "encoded": int(len(todo)), "source": str(Path(validated_path).resolve())})
        except OSError as err:
            raise _disk_error(err, cache_dir, f"{kind} views") from None
        finally:
            shelf.close()
        encoded[kind], reused[kind] = int(len(todo)), int(len(first) - len(todo))
        seconds[kind] = round(time.perf_counter() - t0, 3)
        log.info("%s views: (%d, %d, %d), %d encoded, in %.1f s -> %s", kind, k, n, dim, encoded[kind],
                 seconds[kind], final)
    return ViewResult(paths["image"], paths["text"], k, n, encoded, reused, seconds)


def _image_view_features(fx: FeatureExtractor, train, wanted: list[tuple[int, int]], augment: AugmentConfig,
                         progress: bool) -> np.ndarray:
    """Features of image views ``wanted`` ((view, training row) pairs): decoded, augmented and encoded in batches,
    on a thread per core on a CPU (as ``FeatureExtractor``), each on one torch thread."""
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from crossmodal.data.augment import image_view, view_seed
    from crossmodal.data.images import ImageError, load_image

    size, bs = fx.cfg.image.image_size, fx.image_batch_size
    sources, shas, ids = (train[c].to_numpy() for c in ("image", "image_sha256", "id"))

    def one_batch(start: int) -> np.ndarray:
        xs = []
        for view, r in wanted[start : start + bs]:
            try:
                img = load_image(sources[r], fx.max_pixels)
            except ImageError as err:
                raise FeatureError(f"row id {ids[r]!r}: {err}; re-run `crossmodal validate` to quarantine it") from None
            xs.append(image_view(img, size, augment.image, view_seed(shas[r], view, augment.seed), view))
        return fx.forward_images(torch.stack(xs))

    starts = range(0, len(wanted), bs)
    threads = cpu_threads(fx.cfg.num_workers, fx.device, len(wanted), bs)
    if not threads:
        return np.concatenate([one_batch(s) for s in starts])
    with ThreadPoolExecutor(threads, thread_name_prefix="crossmodal-views", initializer=torch.set_num_threads,
                            initargs=(1,)) as pool, _progress(len(wanted), progress) as bar:
        out = []
        for feats in pool.map(one_batch, starts):
            out.append(feats)
            bar.update(len(feats))
        return np.concatenate(out)


def _progress(total: int, show: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not show, desc="image views", unit="img", dynamic_ncols=True)


# --------------------------------------------------------------------------- shards
# This process's extractor for one EncodersConfig (by its JSON), so that a worker running many shards loads the
# encoders once; one entry only, so that a worker asked for other settings drops the old encoders, not holds both.
_SHARED: dict[str, FeatureExtractor] = {}
_SHARED_LOCK = threading.Lock()  # a Dask worker runs its tasks in threads


def shared_extractor(cfg: EncodersConfig) -> FeatureExtractor:
    """This process's ``FeatureExtractor`` for ``cfg``: the same one on every call with equal settings (its encoders
    load on first use and stay loaded); a call with other settings replaces it."""
    key = cfg.model_dump_json()
    with _SHARED_LOCK:
        fx = _SHARED.get(key)
        if fx is None:
            _SHARED.clear()
            fx = _SHARED[key] = FeatureExtractor(cfg)
        return fx


def _check_call(caller: str, cfg: EncodersConfig, extractor: FeatureExtractor | None, chunk_rows: int) -> None:
    """ValueError for a lent extractor built with another config, or a chunk size below one (a caller's bug)."""
    if extractor is not None and extractor.cfg != cfg:
        raise ValueError(f"{caller}: the extractor was built with another EncodersConfig than cfg")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")


def _precision(cfg: EncodersConfig) -> str:
    """The precision the shelves are keyed by, as ``extract_features`` resolves it on this machine."""
    return precision_name(resolve_precision(cfg.precision, resolve_device(cfg.device)))


def plan_shards(validated_path: str | Path, cfg: EncodersConfig, cache_dir: str | Path,
                shard_items: int) -> list[dict]:
    """The shards that would fill the store for ``extract_features``: per kind, ranges of ``shard_items`` distinct
    items that hold at least one item the shelf lacks (none for a kind whose assembled array is cached).

    Each shard is ``{"kind", "start", "stop", "items", "missing"}``: distinct items ``start``..``stop - 1`` in
    order of first appearance in the table (``encode_shard``'s indices), how many, and how many the shelf lacks
    now. Reads the table and the shelves' index only; loads no encoder.
    """
    if isinstance(shard_items, bool) or not isinstance(shard_items, numbers.Integral) or shard_items < 1:
        raise ConfigError(f"shard_items must be a whole number of at least 1, got {shard_items!r}")
    df = _read_validated(validated_path)
    precision = _precision(cfg)
    keys, shelves = feature_keys(df, cfg, precision), shelf_dirs(cache_dir, cfg, precision)
    shards = []
    for kind in KINDS:
        if _is_cached(_cache_file(cache_dir, kind, keys[kind]), len(df)):
            continue
        items = _Items.of(df, kind)
        shelf = Shelf.open(shelves[kind])
        lacking = shelf.find(items.keys)[0] < 0
        for start in range(0, len(items.keys), int(shard_items)):
            stop = min(start + int(shard_items), len(items.keys))
            missing = int(lacking[start:stop].sum())
            if missing:
                shards.append({"kind": kind, "start": start, "stop": stop, "items": stop - start, "missing": missing})
    return shards


def encode_shard(
    validated_path: str | Path,
    cfg: EncodersConfig,
    cache_dir: str | Path,
    kind: str,
    start: int,
    stop: int,
    *,
    progress: bool = False,
    on_progress: Callable[[str, int, int], None] | None = None,
    extractor: FeatureExtractor | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> dict:
    """Encode the distinct ``kind`` items ``start``..``stop - 1`` (a ``plan_shards`` range) that the shelf lacks now.

    Adds them to the shelf in chunks of ``chunk_rows`` as ``extract_features`` does: a killed shard loses at most
    one chunk, and running it again resumes (it then encodes nothing if it had finished). Safe while other
    processes encode other ranges, or this one, into the same shelf. Returns ``{"kind", "start", "stop", "encoded",
    "seconds"}``, ``encoded`` the items this call encoded. The encoders are this process's ``shared_extractor(cfg)``
    unless ``extractor`` (built with this ``cfg``) is given, and load only if something must be encoded.
    ``on_progress(kind, done, total)`` hears how many of the shard's ``total`` items are ready, once at the start and
    after each encoded batch.
    """
    t0 = time.perf_counter()
    if kind not in KINDS:
        raise ValueError(f"encode_shard: kind must be one of {KINDS}, got {kind!r}")
    if not 0 <= start < stop:
        raise ValueError(f"encode_shard: [{start}, {stop}) is not a range of distinct items")
    _check_call("encode_shard", cfg, extractor, chunk_rows)
    df = _read_validated(validated_path)
    cache_dir = Path(cache_dir)
    precision = _precision(cfg)
    every = _Items.of(df, kind)
    if stop > len(every.keys):
        raise FeatureError(f"{validated_path}: the {kind} shard [{start}, {stop}) lies beyond the table's "
                           f"{len(every.keys)} distinct {kind}s; the table changed since the shards were planned, "
                           "plan them again")
    # No row codes: a shard is encoded, never assembled.
    items = _Items(np.zeros(0, dtype=np.int64), every.keys[start:stop], every.rows[start:stop])
    counts = {"encoded": 0}
    shelf = Shelf.open(shelf_dirs(cache_dir, cfg, precision)[kind])
    try:
        chunk, row = shelf.find(items.keys)
        todo = np.flatnonzero(chunk < 0)
        report = None
        if on_progress is not None:
            stored, total = len(items.keys) - len(todo), len(items.keys)
            on_progress(kind, stored, total)

            def report(done: int, stored: int = stored, total: int = total) -> None:
                on_progress(kind, stored + done, total)
        if len(todo):
            _encode(extractor if extractor is not None else shared_extractor(cfg), kind, df, shelf, items, todo,
                    chunk, row, chunk_rows, counts, progress, validated_path, report)
            shelf.describe({**_headers(cfg, precision)[kind], "encoder_name": getattr(cfg, kind).name})
    except OSError as err:
        raise _disk_error(err, cache_dir, f"{kind} features") from None
    finally:
        shelf.close()
    seconds = round(time.perf_counter() - t0, 3)
    log.info("%s shard [%d, %d): %d distinct items encoded, %d from the store, in %.1f s", kind, start, stop,
             counts["encoded"], stop - start - counts["encoded"], seconds)
    return {"kind": kind, "start": start, "stop": stop, "encoded": counts["encoded"], "seconds": seconds}


def _distinct_count(final: Path, df, kind: str) -> int:
    """Distinct present items behind a cached array: from its description, or counted (an array without one)."""
    try:
        n = json.loads(final.with_suffix(".json").read_text(encoding="utf-8")).get("distinct")
    except (OSError, ValueError, AttributeError):
        n = None
    return n if isinstance(n, int) and not isinstance(n, bool) else len(_Items.of(df, kind).keys)


def _extract(kind: str, df, items: _Items, final: Path, shelf_dir: Path, header: dict, encoder: str,
             get_fx: Callable[[], FeatureExtractor], chunk_rows: int, counts: dict, progress: bool, source,
             on_progress: Callable[[str, int, int], None] | None = None) -> int:
    """Encode the items the shelf lacks, then assemble ``final``; returns the feature dimension.

    A chunk removed while it is read (``--force`` replacing the shelf's chunks) costs one more look at the shelf,
    where its items are then found in the chunks that replaced it.
    """
    looks = 2
    while True:
        shelf = Shelf.open(shelf_dir)
        try:
            chunk, row = shelf.find(items.keys)
            todo = np.flatnonzero(chunk < 0)
            log.info("%s features: %d distinct items, %d in the store (%d chunks), encoding %d", kind, len(items.keys),
                     len(items.keys) - len(todo), len(shelf.names), len(todo))
            report = None
            if on_progress is not None:
                stored = len(items.keys) - len(todo)
                on_progress(kind, stored, len(items.keys))

                def report(done: int, stored: int = stored, total: int = len(items.keys)) -> None:
                    on_progress(kind, stored + done, total)
            if len(todo):
                _encode(get_fx(), kind, df, shelf, items, todo, chunk, row, chunk_rows, counts, progress, source,
                        report)
            if shelf.dim is not None:
                shelf.describe({**header, "encoder_name": encoder})
                dim = shelf.dim
            else:  # nothing to encode, nothing stored (every row lacks this modality): only the width is needed
                dim = get_fx().image_dim if kind == "image" else get_fx().text_dim
            _assemble(final, items.codes, chunk, row, shelf, dim)
            return int(dim)
        except ChunkGone as err:
            looks -= 1
            if not looks:
                raise
            log.warning("%s features: %s (%s); looking at the store again", kind, err.strerror, err.filename)
        finally:
            shelf.close()


def _encode(fx: FeatureExtractor, kind: str, df, shelf: Shelf, items: _Items, todo: np.ndarray, chunk: np.ndarray,
            row: np.ndarray, chunk_rows: int, counts: dict, progress: bool, source,
            report: Callable[[int], None] | None = None) -> None:
    """Encode the distinct items ``todo`` in one pass, adding a chunk to the shelf each time ``chunk_rows`` are done.

    ``chunk``/``row`` learn where each new item went; ``report(n)`` hears after each batch that n items are encoded.
    """
    from crossmodal.data.images import ImageError

    bounds = [(s, min(s + chunk_rows, len(todo))) for s in range(0, len(todo), chunk_rows)]
    buf: list[np.ndarray] = []
    have, k, done = 0, 0, 0

    def take(feats: np.ndarray) -> None:
        nonlocal have, k, done
        buf.append(feats)
        have += len(feats)
        done += len(feats)
        while k < len(bounds) and have >= bounds[k][1] - bounds[k][0]:
            s, e = bounds[k]
            block = np.concatenate(buf) if len(buf) > 1 else buf[0]
            new = todo[s:e]
            chunk[new] = shelf.add(items.keys[new], block[: e - s])
            row[new] = np.arange(e - s)
            counts["encoded"] += e - s
            rest = block[e - s:]
            buf[:] = [rest] if len(rest) else []
            have -= e - s
            k += 1
        if report is not None:
            report(done)

    rows = items.rows[todo]
    if kind == "image":
        sources = df["image"].to_numpy()[rows].tolist()
        names = [f"row id {i!r}" for i in df["id"].to_numpy()[rows]]
        try:
            for feats in fx.iter_image_features(sources, progress=progress, names=names):
                take(feats)
        except ImageError as err:  # validation decoded it, so the file changed or vanished since
            raise FeatureError(f"{source}: {err}; re-run `crossmodal validate` to quarantine it") from None
    else:
        texts = df["text"].to_numpy()[rows].tolist()
        for feats in fx.iter_text_features(texts, progress=progress, chunk=min(chunk_rows, len(todo))):
            take(feats)
    if k != len(bounds):  # an extractor bug, not a user error
        raise RuntimeError(f"{kind} features: {have} rows left over after {k} of {len(bounds)} chunks")


def _assemble(final: Path, codes: np.ndarray, chunk: np.ndarray, row: np.ndarray, shelf: Shelf, dim: int) -> None:
    """Stream the shelf's rows into ``final`` (N, dim) in table order, one block of rows at a time (NaN where absent).

    Each block reads only the rows it needs from the chunks it touches (memory-mapped), so memory stays flat.
    """
    n = len(codes)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False, "shape": (n, dim)}
    with atomic_path(final) as tmp, open(tmp, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for r0 in range(0, n, ASSEMBLE_ROWS):
            c = codes[r0 : r0 + ASSEMBLE_ROWS]
            block = np.full((len(c), dim), np.nan, dtype=np.float32)
            at = np.flatnonzero(c >= 0)
            ch, rw = chunk[c[at]], row[c[at]]
            order = np.argsort(ch, kind="stable")
            for group in np.split(order, np.flatnonzero(np.diff(ch[order])) + 1):
                if len(group):
                    block[at[group]] = shelf.rows(int(ch[group[0]]))[rw[group]]
            fh.write(block.tobytes())


def replace_store(result: FeatureResult, private_cache: str | Path, cache_dir: str | Path) -> FeatureResult:
    """Move what ``extract_features`` wrote into ``private_cache`` into the store ``cache_dir``, replacing it there.

    ``--force`` extracts into a fresh private store (so every item is encoded) and moves it in: each shelf chunk
    wins over the entries it replaces (``crossmodal.features.shelf.replace_shelf``), and each assembled array with
    its description lands on the cached one with one atomic rename, so a run reading the store meanwhile sees the
    old file or the new one, never a missing one. Returns ``result`` with the paths that pointed into
    ``private_cache`` pointing into ``cache_dir``.
    """
    private_cache, cache_dir = Path(private_cache).resolve(), Path(cache_dir).resolve()
    for kind in KINDS:
        for src in sorted((private_cache / kind / ITEMS_DIR).glob("*")):
            replace_shelf(src, cache_dir / src.relative_to(private_cache))
        key = getattr(result, f"{kind}_key")
        src, dst = _cache_file(private_cache, kind, key), _cache_file(cache_dir, kind, key)
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.with_suffix(".json").is_file():
                os.replace(src.with_suffix(".json"), dst.with_suffix(".json"))
            os.replace(src, dst)
        if Path(getattr(result, f"{kind}_path")).resolve() == src:
            setattr(result, f"{kind}_path", dst)
    return result
