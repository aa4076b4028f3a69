"""The feature store: image and text features for every validated row, content-addressed on disk.

Usage::

    from crossmodal.extract import extract_features
    res = extract_features("work/validated/validated.parquet", cfg.encoders, ".cache/crossmodal")
    res.image_path, res.text_path, res.computed        # .npy files in validated.parquet row order

The feature store is content-addressed: the image key hashes the ordered ``image_sha256`` list, the
text key the ordered texts, each with its encoder name, its parameters (image size / max length) and
the precision. Image and text are cached separately, so changing the image size leaves the text
features alone. A second run with nothing changed reads the cache and never loads an encoder.

A row whose image or text is absent (null in validated.parquet, kept by ``validation.allow_missing``)
is not encoded: its row in that modality's array is all NaN, the marker every head understands.

The encoders themselves (device, precision, batching) live in ``crossmodal.embed``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crossmodal.atomic import atomic_path, write_bytes, write_json
from crossmodal.config import EncodersConfig
from crossmodal.data import DataError
from crossmodal.embed import (  # noqa: F401  (re-exported: the extraction API in one place)
    FeatureExtractor,
    cpu_has_fast_bf16,
    precision_name,
    resolve_device,
    resolve_precision,
)
from crossmodal.encoders import canonical_name

log = logging.getLogger(__name__)

# Bump when preprocessing or pooling changes in a way that changes features: old cache entries then miss.
FEATURE_VERSION = 1
VALIDATED_COLUMNS = ("id", "image", "text", "image_sha256")


class FeatureError(DataError):
    """The validated table cannot be turned into features; the message names the file, column or row."""




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


def _read_validated(path: str | Path):
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FeatureError(f"{path} not found; run `crossmodal validate` first")
    try:
        df = pd.read_parquet(path)
    except Exception as err:
        raise FeatureError(f"{path} is not a readable parquet file ({err}); re-run `crossmodal validate`") from None
    missing = [c for c in VALIDATED_COLUMNS if c not in df.columns]
    if missing:
        raise FeatureError(f"{path} lacks column(s) {missing}; it must come from `crossmodal validate`")
    if df.empty:
        raise FeatureError(f"{path} has no rows: nothing to extract (see the quarantine table next to it)")
    # An absent image is null in both columns; one without the other means the table was edited by hand.
    empty = {col: df[col].isna() | (df[col].astype(str) == "") for col in ("image", "image_sha256")}
    bad = empty["image"] != empty["image_sha256"]
    if bad.any():
        col = "image" if empty["image"][bad].iloc[0] else "image_sha256"
        raise FeatureError(f"{path}: column {col!r} is empty in row id {df['id'][bad].iloc[0]!r}; re-run validate")
    both = empty["image"] & df["text"].isna()
    if both.any():
        raise FeatureError(f"{path}: row id {df['id'][both].iloc[0]!r} has neither an image nor a text; re-run "
                           "validate")
    return df


ABSENT = "\x00"  # stands for an absent image or text in cache keys: clean_text removes NUL, a sha256 has none


def _present(column) -> np.ndarray:
    return (column.notna() & (column.astype(str) != "")).to_numpy()


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
        "image": _key("image", df["image_sha256"].where(_present(df["image_sha256"]), ABSENT),
                      canonical_name(cfg.image.name), {"image_size": cfg.image.image_size}, precision),
        "text": _key("text", df["text"].where(df["text"].notna(), ABSENT), canonical_name(cfg.text.name),
                     {"max_length": cfg.text.max_length}, precision),
    }


def _cache_file(cache_dir: str | Path, kind: str, key: str) -> Path:
    return Path(cache_dir) / kind / f"{key}.npy"


def _is_cached(path: Path, rows: int) -> bool:
    if not path.is_file():
        return False
    try:
        arr = np.load(path, mmap_mode="r")  # reads the header only
        return arr.ndim == 2 and arr.shape[0] == rows and arr.dtype == np.float32
    except (OSError, ValueError) as err:
        log.warning("ignoring unreadable cache file %s (%s); recomputing", path, err)
        return False


def _save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a handle: given a name, np.save appends ".npy"
        np.save(fh, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)


def extract_features(
    validated_path: str | Path,
    cfg: EncodersConfig,
    cache_dir: str | Path,
    out_dir: str | Path | None = None,
    *,
    progress: bool = True,
    extractor: FeatureExtractor | None = None,
) -> FeatureResult:
    """Image and text features for every row of ``validated.parquet``, from the cache when possible.

    Identical images (same sha256) and identical texts are encoded once. With ``out_dir`` the arrays are
    also copied to out_dir/image.npy and out_dir/text.npy with out_dir/features.json (for DVC), and the
    result's paths point there; otherwise they point into the cache. ``extractor`` (built with this same
    ``cfg``) lends its already-loaded encoders, e.g. to a long-lived worker; by default encoders are
    loaded only if something must be computed.
    """
    if extractor is not None and extractor.cfg != cfg:
        raise ValueError("extract_features: the extractor was built with another EncodersConfig than cfg")
    df = _read_validated(validated_path)
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
            arr = _compute(fx, kind, df, progress, validated_path)
            seconds[kind] = round(time.perf_counter() - t0, 3)
            _save_npy(path, arr)
            write_json(path.with_suffix(".json"), sort_keys=True, obj={
                "key": keys[kind], "kind": kind, "rows": len(df), "dim": arr.shape[1], "precision": precision,
                "encoder": getattr(cfg, kind).name, "params": getattr(cfg, kind).model_dump(exclude={"batch_size"}),
                "seconds": seconds[kind], "device": str(fx.device), "source": str(Path(validated_path).resolve()),
            })
            log.info("%s features: computed %s in %.1f s -> %s", kind, arr.shape, seconds[kind], path)
        else:
            log.info("%s features: cache hit %s", kind, path)
        dims[kind] = int(np.load(path, mmap_mode="r").shape[1])

    result = FeatureResult(paths["image"], paths["text"], keys["image"], keys["text"], computed, len(df),
                           dims["image"], dims["text"], cfg.image.name, cfg.text.name, precision, seconds)
    if out_dir is not None:
        out = Path(out_dir)
        for kind in ("image", "text"):
            # A copy, not a link: DVC tracks out_dir and may move it into its own cache.
            dst = out / f"{kind}.npy"
            write_bytes(dst, paths[kind].read_bytes())
        result.image_path, result.text_path = (out / "image.npy").resolve(), (out / "text.npy").resolve()
        # Only what the arrays depend on (no timings, no absolute paths): same inputs, same bytes for DVC.
        write_json(out / "features.json", sort_keys=True, obj={
            "image_key": result.image_key, "text_key": result.text_key, "rows": len(df),
            "shapes": {"image": [len(df), dims["image"]], "text": [len(df), dims["text"]]},
            "image_encoder": cfg.image.name, "text_encoder": cfg.text.name, "precision": precision,
            "image_size": cfg.image.image_size, "max_length": cfg.text.max_length,
        })
    return result


def _compute(fx: FeatureExtractor, kind: str, df, progress: bool, source) -> np.ndarray:
    import pandas as pd

    from crossmodal.preprocess import ImageError

    # Encode each distinct image (by content) / text once, then scatter back to row order. Absent ones
    # are never encoded: their rows stay NaN.
    column = "image_sha256" if kind == "image" else "text"
    present = _present(df[column]) if kind == "image" else df["text"].notna().to_numpy()
    rows = df[present]
    codes, _ = pd.factorize(rows[column])
    _, first = np.unique(codes, return_index=True)  # row of the first occurrence of each code, in code order
    if kind == "image":
        names = [f"row id {rows['id'].iloc[i]!r}" for i in first]
        try:
            uniq = fx.embed_images(rows["image"].iloc[first].tolist(), progress=progress, names=names)
        except ImageError as err:  # validation decoded it, so the file changed or vanished since
            raise FeatureError(f"{source}: {err}; re-run `crossmodal validate` to quarantine it") from None
    else:
        uniq = fx.embed_texts(rows["text"].iloc[first].tolist(), progress=progress)
    dim = fx.image_dim if kind == "image" else fx.text_dim
    out = np.full((len(df), dim), np.nan, dtype=np.float32)
    out[present] = uniq[codes]
    return out
