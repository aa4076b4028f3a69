"""Feature extraction: pretrained encoders turn images and captions into fixed-size vectors, cached on disk.

Usage::

    from crossmodal.extract import FeatureExtractor, extract_features
    fx = FeatureExtractor(cfg.encoders)                   # encoders load on first use
    img = fx.embed_images(["a.jpg", open("b.png", "rb").read()])   # float32 (2, fx.image_dim)
    txt = fx.embed_texts(["a red bus", "two cats"])                # float32 (2, fx.text_dim)

    res = extract_features("work/validated/validated.parquet", cfg.encoders, ".cache/crossmodal")
    res.image_path, res.text_path, res.computed        # .npy files in validated.parquet row order

The feature store is content-addressed: the image key hashes the ordered ``image_sha256`` list, the
text key the ordered texts, each with its encoder name, its parameters (image size / max length) and
the precision. Image and text are cached separately, so changing the image size leaves the text
features alone. A second run with nothing changed reads the cache and never loads an encoder.

Speed on CPU comes from layout and precision more than from batching: channels_last makes depthwise
convolutions ~2x faster and bf16 autocast another ~2x on CPUs with AVX512-BF16/AMX (fp32 elsewhere).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from crossmodal.config import ConfigError, EncodersConfig
from crossmodal.data import DataError
from crossmodal.encoders import ImageEncoder, TextEncoder, canonical_name, load_image_encoder, load_text_encoder

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Bump when preprocessing or pooling changes in a way that changes features: old cache entries then miss.
FEATURE_VERSION = 1
VALIDATED_COLUMNS = ("id", "image", "text", "image_sha256")


class FeatureError(DataError):
    """The validated table cannot be turned into features; the message names the file, column or row."""


# --------------------------------------------------------------------------- device and precision
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA, else Apple MPS, else CPU. Asking for a device that is absent is a ConfigError."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"encoders.device {name!r} is not a device; use auto, cpu, cuda or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("encoders.device is 'cuda' but this torch sees no CUDA GPU; set encoders.device: auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("encoders.device is 'mps' but Apple MPS is not available; set encoders.device: auto or cpu")
    return device


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AMX or AVX512-BF16) that oneDNN uses."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:  # private helpers moved: read the flags ourselves (Linux)
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
        except OSError:
            return False
        return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    ``auto`` picks bf16 where it is fast (CUDA with bf16 support, a CPU with AMX/AVX512-BF16),
    fp16 on older CUDA GPUs, and fp32 otherwise (bf16 emulated in software is slower than fp32).
    """
    import torch

    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ConfigError(f"encoders.precision {precision!r} is not one of auto, fp32, bf16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """``None`` -> "fp32", ``torch.bfloat16`` -> "bf16", ``torch.float16`` -> "fp16" (as in cache keys)."""
    return "fp32" if dtype is None else {"torch.bfloat16": "bf16", "torch.float16": "fp16"}[str(dtype)]


# --------------------------------------------------------------------------- image decoding (DataLoader)
class _ImageSources:
    """Map-style dataset: index -> (index, uint8 tensor or None, error or None).

    Decoding errors are returned, not raised: raised inside a DataLoader worker they come back wrapped in
    a worker traceback; returned, the main process can name the image plainly.
    """

    def __init__(self, sources: list, size: int, max_pixels: int | None, names: list[str] | None):
        self.sources, self.size, self.max_pixels, self.names = sources, size, max_pixels, names

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, i: int):
        from crossmodal.preprocess import image_to_tensor, load_image

        src = self.sources[i]
        try:
            return i, image_to_tensor(load_image(src, self.max_pixels), self.size), None
        except Exception as err:  # ImageError, or a TypeError for a source that is neither path nor bytes
            what = self.names[i] if self.names else f"image {i}"
            shown = f"{len(src)} bytes" if isinstance(src, bytes | bytearray) else str(src)
            return i, None, f"{what} ({shown}): {err}"


def _collate(batch: list):
    import torch

    idx = [b[0] for b in batch]
    errors = [b[2] for b in batch if b[2] is not None]
    x = torch.stack([b[1] for b in batch]) if not errors else None
    return idx, x, errors


# --------------------------------------------------------------------------- the extractor
class FeatureExtractor:
    """Both encoders with their preprocessing; used by ``extract_features`` and by the served model.

    Encoders load lazily on first use. Already-loaded encoders may be passed in to share them.
    ``max_pixels`` bounds decoded image size (decompression-bomb guard; Pillow's default when None).
    """

    def __init__(
        self,
        cfg: EncodersConfig | None = None,
        *,
        image_encoder: ImageEncoder | None = None,
        text_encoder: TextEncoder | None = None,
        max_pixels: int | None = None,
    ):
        self.cfg = cfg if cfg is not None else EncodersConfig()
        self.device = resolve_device(self.cfg.device)
        self.dtype = resolve_precision(self.cfg.precision, self.device)
        self.max_pixels = max_pixels
        for enc, want in ((image_encoder, self.cfg.image.name), (text_encoder, self.cfg.text.name)):
            if enc is not None and canonical_name(enc.name) != canonical_name(want):
                raise ValueError(f"FeatureExtractor: encoder {enc.name!r} was passed but the config names {want!r}")
        self._image, self._text = image_encoder, text_encoder

    @property
    def precision(self) -> str:
        return precision_name(self.dtype)

    @property
    def image_encoder(self) -> ImageEncoder:
        if self._image is None:
            self._image = load_image_encoder(self.cfg.image.name, self.device)
        return self._image

    @property
    def text_encoder(self) -> TextEncoder:
        if self._text is None:
            self._text = load_text_encoder(self.cfg.text.name, self.device)
        return self._text

    @property
    def image_dim(self) -> int:
        return self.image_encoder.dim

    @property
    def text_dim(self) -> int:
        return self.text_encoder.dim

    def _autocast(self):
        import torch

        return torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def embed_images(self, sources: list, progress: bool = False, names: list[str] | None = None) -> np.ndarray:
        """Paths or encoded bytes -> float32 (N, image_dim). ``names`` label images in error messages."""
        import torch
        from torch.utils.data import DataLoader

        from crossmodal.preprocess import ImageError

        enc = self.image_encoder
        out = np.empty((len(sources), enc.dim), dtype=np.float32)
        if not len(sources):
            return out
        # Normalise on the device, in one fused op on uint8 input: (x/255 - mean)/std == (x - 255 mean)/(255 std).
        mean = torch.tensor(enc.mean, device=self.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(enc.std, device=self.device).view(1, 3, 1, 1) * 255
        loader = DataLoader(
            _ImageSources(list(sources), self.cfg.image.image_size, self.max_pixels, names),
            batch_size=self.cfg.image.batch_size,
            num_workers=self.cfg.num_workers,
            collate_fn=_collate,
            pin_memory=self.device.type == "cuda",
        )
        fmt = torch.channels_last if enc.channels_last else torch.contiguous_format
        with _bar(len(sources), progress, "image features", "img") as bar, torch.inference_mode():
            for idx, x, errors in loader:
                if errors:
                    more = f" (and {len(errors) - 1} more in this batch)" if len(errors) > 1 else ""
                    raise ImageError(f"cannot embed {errors[0]}{more}")
                x = x.to(self.device, non_blocking=True).float().sub_(mean).div_(std).contiguous(memory_format=fmt)
                with self._autocast():
                    feats = enc.module(x)
                out[idx] = feats.float().cpu().numpy()
                bar.update(len(idx))
        return out

    def embed_texts(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Captions -> float32 (N, text_dim); texts pass through ``clean_text`` first (as in validation)."""
        import torch

        from crossmodal.preprocess import clean_text

        enc = self.text_encoder
        out = np.empty((len(texts), enc.dim), dtype=np.float32)
        if not len(texts):
            return out
        # Lone surrogates (undecodable bytes kept by the manifest reader) would crash the Rust tokenizer.
        cleaned = [clean_text(t).encode("utf-8", "replace").decode("utf-8") for t in texts]
        max_len = min(self.cfg.text.max_length, enc.max_positions)
        tok = enc.tokenizer
        # Longest first, so similar lengths share a batch (less padding) and an out-of-memory shows at once.
        lengths = [len(ids) for ids in tok(cleaned, truncation=True, max_length=max_len)["input_ids"]]
        order = np.argsort(-np.asarray(lengths), kind="stable")
        bs = self.cfg.text.batch_size
        with _bar(len(texts), progress, "text features", "text") as bar, torch.inference_mode():
            for start in range(0, len(order), bs):
                idx = order[start : start + bs]
                batch = tok([cleaned[i] for i in idx], padding=True, truncation=True, max_length=max_len,
                            return_tensors="pt").to(self.device)
                with self._autocast():
                    hidden = enc.model(**batch)[0]  # last_hidden_state
                out[idx] = enc.pool(hidden, batch["attention_mask"]).cpu().numpy()
                bar.update(len(idx))
        return out


def _bar(total: int, show: bool, desc: str, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not show, file=sys.stderr, desc=desc, unit=unit, dynamic_ncols=True)


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
    for col in ("image", "image_sha256"):
        bad = df[col].isna() | (df[col].astype(str) == "")
        if bad.any():
            raise FeatureError(f"{path}: column {col!r} is empty in row id {df['id'][bad].iloc[0]!r}; re-run validate")
    return df


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
        "image": _key("image", df["image_sha256"], canonical_name(cfg.image.name),
                      {"image_size": cfg.image.image_size}, precision),
        "text": _key("text", df["text"].fillna(""), canonical_name(cfg.text.name),
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


def _atomic_write(path: Path, write) -> None:
    """Write via a temporary file in the same folder, then rename: readers see the old file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name opened with "x" (not mkstemp, whose 0600 mode would make a shared cache unreadable).
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
    try:
        with open(tmp, "xb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_npy(path: Path, arr: np.ndarray) -> None:
    _atomic_write(path, lambda fh: np.save(fh, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False))


def _save_json(path: Path, obj: dict) -> None:
    _atomic_write(path, lambda fh: fh.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def cached_features(validated_path: str | Path, cfg: EncodersConfig, cache_dir: str | Path) -> FeatureResult | None:
    """The cached result for this table and config, or None when either modality would need computing."""
    df = _read_validated(validated_path)
    precision = precision_name(resolve_precision(cfg.precision, resolve_device(cfg.device)))
    keys = feature_keys(df, cfg, precision)
    paths = {k: _cache_file(cache_dir, k, key) for k, key in keys.items()}
    if not all(_is_cached(p, len(df)) for p in paths.values()):
        return None
    dims = {k: int(np.load(p, mmap_mode="r").shape[1]) for k, p in paths.items()}
    return FeatureResult(paths["image"], paths["text"], keys["image"], keys["text"], {"image": False, "text": False},
                         len(df), dims["image"], dims["text"], cfg.image.name, cfg.text.name, precision)


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
            _save_json(path.with_suffix(".json"), {
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
            _atomic_write(dst, lambda fh, src=paths[kind]: fh.write(src.read_bytes()))
        result.image_path, result.text_path = (out / "image.npy").resolve(), (out / "text.npy").resolve()
        # Only what the arrays depend on (no timings, no absolute paths): same inputs, same bytes for DVC.
        _save_json(out / "features.json", {
            "image_key": result.image_key, "text_key": result.text_key, "rows": len(df),
            "shapes": {"image": [len(df), dims["image"]], "text": [len(df), dims["text"]]},
            "image_encoder": cfg.image.name, "text_encoder": cfg.text.name, "precision": precision,
            "image_size": cfg.image.image_size, "max_length": cfg.text.max_length,
        })
    return result


def _compute(fx: FeatureExtractor, kind: str, df, progress: bool, source) -> np.ndarray:
    import pandas as pd

    from crossmodal.preprocess import ImageError

    # Encode each distinct image (by content) / text once, then scatter back to row order.
    column = "image_sha256" if kind == "image" else "text"
    codes, _ = pd.factorize(df[column].fillna("") if kind == "text" else df[column])
    _, first = np.unique(codes, return_index=True)  # row of the first occurrence of each code, in code order
    if kind == "image":
        names = [f"row id {df['id'].iloc[i]!r}" for i in first]
        try:
            uniq = fx.embed_images(df["image"].iloc[first].tolist(), progress=progress, names=names)
        except ImageError as err:  # validation decoded it, so the file changed or vanished since
            raise FeatureError(f"{source}: {err}; re-run `crossmodal validate` to quarantine it") from None
    else:
        uniq = fx.embed_texts(df["text"].fillna("").iloc[first].tolist(), progress=progress)
    return uniq[codes]
