"""Embedding: pretrained encoders turn raw images and texts into fixed-size vectors, batched, on the best device.

Used by the feature store (``crossmodal.features.extract``) and by the served model
(``crossmodal.serving.fused_model``), so training and serving embed inputs the same way. Device, precision, batch
sizes and worker counts are decided in ``crossmodal.hardware``; image decoding is
``crossmodal.features.image_sources``, batched JPEG decoding on CUDA ``crossmodal.features.jpeg``.

Usage::

    from crossmodal.config import EncodersConfig
    from crossmodal.features.extractor import FeatureExtractor
    fx = FeatureExtractor(EncodersConfig())                          # encoders load on first use
    img = fx.embed_images(["a.jpg", open("b.png", "rb").read()])     # float32 (2, fx.image_dim)
    txt = fx.embed_texts(["a red bus", "two cats"])                  # float32 (2, fx.text_dim)
    for feats in fx.iter_image_features(["a.jpg", "b.png"]):         # the same, one batch at a time
        ...

On a CPU the speed comes from layout and precision more than from batching: channels-last, bf16 autocast where
the CPU is fast at it, BatchNorm folded into the convolutions, and every core decoding and encoding its own
batches. Texts are tokenized once per chunk and batched by length. Batch sizes halve whenever the device runs out
of memory.
"""

from __future__ import annotations

import logging
import sys

import numpy as np

from crossmodal.config import EncodersConfig
from crossmodal.encoders.image import ImageEncoder
from crossmodal.encoders.registry import canonical_name, load_image_encoder, load_text_encoder
from crossmodal.encoders.text import TextEncoder
from crossmodal.features.image_sources import ImageSources, collate
from crossmodal.hardware import (
    LOADER_BATCH,
    auto_batch_size,
    auto_num_workers,
    autocast,
    cpu_threads,
    is_oom,
    precision_name,
    resolve_device,
    resolve_precision,
)

log = logging.getLogger(__name__)

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
        self._image_module = None  # the image encoder's inference graph (BatchNorm folded), built on first use
        # Current forward batch sizes: start from the config, halve for good after an out-of-memory error.
        self.image_batch_size = auto_batch_size("image", self.cfg.image.batch_size, self.device)
        self.text_batch_size = auto_batch_size("text", self.cfg.text.batch_size, self.device)
        # Batched nvJPEG decoding on CUDA (crossmodal.features.jpeg); CPU decoding everywhere else.
        self.gpu_jpeg = self.device.type == "cuda"

    @property
    def precision(self) -> str:
        return precision_name(self.dtype)

    @property
    def image_encoder(self) -> ImageEncoder:
        if self._image is None:
            self._image = load_image_encoder(self.cfg.image.name, self.device)
        return self._image

    @property
    def image_module(self):
        """The image encoder as it runs here: a copy with every BatchNorm folded into its convolution
        (``encoders.image.fold_batchnorm``; the same features to within float rounding, checked at build time).
        ``image_encoder.module`` itself stays untouched: fine-tuning and the benchmarks' baselines use it."""
        if self._image_module is None:
            from crossmodal.encoders.image import fold_batchnorm

            self._image_module, folds = fold_batchnorm(self.image_encoder.module)
            log.debug("image encoder %s: %d BatchNorm layers folded", self.image_encoder.name, folds)
        return self._image_module

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

    def _shrink(self, attr: str, err: BaseException) -> None:
        """After an out-of-memory error: halve the batch size (for the rest of this extractor's life) or give up."""
        import torch

        size = getattr(self, attr)
        if size <= 1 or not is_oom(err):
            raise err
        setattr(self, attr, size // 2)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        log.warning("out of memory on %s at batch size %d; continuing with %d", self.device, size, size // 2)

    # ---------------------------------------------------------------- images
    def embed_images(self, sources: list, progress: bool = False, names: list[str] | None = None) -> np.ndarray:
        """Paths or encoded bytes -> float32 (N, image_dim). ``names`` label images in error messages."""
        feats = list(self.iter_image_features(sources, progress=progress, names=names))
        return np.concatenate(feats) if feats else np.empty((0, self.image_encoder.dim), dtype=np.float32)

    def iter_image_features(self, sources: list, progress: bool = False, names: list[str] | None = None):
        """Like :meth:`embed_images`, one float32 (batch, image_dim) array at a time, in the order of ``sources``.

        On a CPU with ``encoders.num_workers: auto`` and more than a couple of batches, every core runs its own
        batches from decoding to features (:meth:`_iter_threaded`); otherwise decoding runs in DataLoader workers
        (``num_workers`` processes) and overlaps with the encoder. Raises ImageError naming the first image that
        cannot be decoded.
        """
        import torch
        from torch.utils.data import DataLoader

        from crossmodal.data.images import ImageError

        if not len(sources):
            return
        self.image_module  # noqa: B018  (load it before the workers start: a load error then comes first)
        threads = cpu_threads(self.cfg.num_workers, self.device, len(sources), self.image_batch_size)
        if threads:
            yield from self._iter_threaded(list(sources), names, threads, progress)
            return
        loader_bs = self.image_batch_size
        if self.cfg.image.batch_size == "auto":  # decode in larger batches than the encoder's (see AUTO_BATCH)
            loader_bs = max(loader_bs, LOADER_BATCH)
        workers = auto_num_workers(self.cfg.num_workers, self.device, len(sources), loader_bs)
        dataset = ImageSources(list(sources), self.cfg.image.image_size, self.max_pixels, names, self.gpu_jpeg)
        loader = DataLoader(
            dataset,
            batch_size=loader_bs,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.device.type == "cuda",  # page-locked host memory: the copy below can be asynchronous
            prefetch_factor=4 if workers else None,
        )
        with _bar(len(sources), progress, "image features", "img") as bar, torch.inference_mode():
            for idx, items, errors in loader:
                if errors:
                    more = f" (and {len(errors) - 1} more in this batch)" if len(errors) > 1 else ""
                    raise ImageError(f"cannot embed {errors[0]}{more}")
                yield self.forward_images(self._to_device(items, idx, dataset))
                bar.update(len(idx))

    def _iter_threaded(self, sources: list, names: list[str] | None, threads: int, progress: bool):
        """The CPU pipeline: ``threads`` threads, each on one torch thread, each decoding a batch and encoding it.

        Why not decoding workers plus a multi-threaded encoder: on a machine with few cores the decoding process
        takes a core from the encoder's OpenMP team, whose threads then wait on each other at every layer; a thread
        per core doing both avoids that (decoding and torch release the GIL, and torch's thread count is per calling
        thread). Batches come back in input order; at most two per thread are in flight, so memory stays flat.
        """
        import collections
        import itertools
        from concurrent.futures import ThreadPoolExecutor

        import torch

        from crossmodal.data.images import ImageError

        dataset = ImageSources(sources, self.cfg.image.image_size, self.max_pixels, names)
        bs = self.image_batch_size

        def one_batch(start: int):
            idx, items, errors = collate([dataset[i] for i in range(start, min(start + bs, len(sources)))])
            if errors:
                more = f" (and {len(errors) - 1} more in this batch)" if len(errors) > 1 else ""
                raise ImageError(f"cannot embed {errors[0]}{more}")
            return self.forward_images(torch.stack([t for _, t in items]))

        starts = iter(range(0, len(sources), bs))
        with _bar(len(sources), progress, "image features", "img") as bar, \
                ThreadPoolExecutor(threads, thread_name_prefix="crossmodal-image",
                                   initializer=torch.set_num_threads, initargs=(1,)) as pool:
            pending = collections.deque(pool.submit(one_batch, s) for s in itertools.islice(starts, 2 * threads))
            try:
                while pending:
                    feats = pending.popleft().result()
                    for s in starts:  # keep the pool busy: one new batch for each one taken
                        pending.append(pool.submit(one_batch, s))
                        break
                    bar.update(len(feats))
                    yield feats
            finally:
                for fut in pending:  # an error or a consumer that stops early: drop the batches not started
                    fut.cancel()

    def forward_images(self, x) -> np.ndarray:
        """uint8 (B, 3, S, S) images, already preprocessed (on any device) -> float32 (B, image_dim).

        Normalises on the device, runs the encoder under autocast in sub-batches of ``image_batch_size``,
        halving it on an out-of-memory error and retrying.
        """
        import torch

        enc, module = self.image_encoder, self.image_module
        # One fused op on uint8 input: (x/255 - mean)/std == (x - 255 mean)/(255 std).
        mean = torch.tensor(enc.mean, device=self.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(enc.std, device=self.device).view(1, 3, 1, 1) * 255
        fmt = torch.channels_last if enc.channels_last else torch.contiguous_format
        out, start = [], 0
        with torch.inference_mode():
            while start < len(x):
                bs = self.image_batch_size
                try:
                    xb = x[start : start + bs].to(self.device, non_blocking=True).float().sub_(mean).div_(std)
                    with autocast(self.device, self.dtype):
                        out.append(module(xb.contiguous(memory_format=fmt)).float())
                except (RuntimeError, MemoryError) as err:
                    self._shrink("image_batch_size", err)
                    continue
                start += bs
        return torch.cat(out).cpu().numpy()

    def _to_device(self, items: list, idx: list[int], dataset: ImageSources):
        """One uint8 (B, 3, S, S) batch on the device from CPU-decoded pixels and/or JPEG bytes."""
        import torch

        from crossmodal.data.images import ImageError

        pixels = [k for k, (tag, _) in enumerate(items) if tag == "pixels"]
        if len(pixels) == len(items):
            return torch.stack([t for _, t in items]).to(self.device, non_blocking=True)
        from crossmodal.features.jpeg import decode_resize

        size = dataset.size
        x = torch.empty((len(items), 3, size, size), dtype=torch.uint8, device=self.device)
        if pixels:
            x[pixels] = torch.stack([items[k][1] for k in pixels]).to(self.device, non_blocking=True)
        jpegs = [k for k, (tag, _) in enumerate(items) if tag == "jpeg"]
        try:
            x[jpegs] = decode_resize([items[k][1] for k in jpegs], size, self.device)
        except RuntimeError:  # one file the device decoder rejects fails the batch: redo them one by one
            for k in jpegs:
                try:
                    x[k] = decode_resize([items[k][1]], size, self.device)[0]
                except RuntimeError:
                    from crossmodal.data.images import image_to_tensor, load_image

                    try:  # Pillow decides, and names the problem if there is one
                        x[k] = image_to_tensor(load_image(items[k][1].numpy().tobytes(), dataset.max_pixels),
                                               size).to(self.device)
                    except ImageError as err:
                        raise ImageError(f"cannot embed {dataset.describe(idx[k], err)}") from None
        return x

    # ---------------------------------------------------------------- texts
    def embed_texts(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Captions -> float32 (N, text_dim); texts pass through ``clean_text`` first (as in validation)."""
        feats = list(self.iter_text_features(texts, progress=progress))
        return np.concatenate(feats) if feats else np.empty((0, self.text_encoder.dim), dtype=np.float32)

    def iter_text_features(self, texts: list[str], progress: bool = False, chunk: int = 4096):
        """Like :meth:`embed_texts`, one float32 (n, text_dim) array per ``chunk`` texts, in input order.

        Within a chunk, texts are tokenized once (the fast Rust tokenizer, in one call), sorted by length so that
        a batch holds similar lengths and padding wastes little compute, encoded, and put back in input order.
        """
        import torch

        from crossmodal.data.text import clean_text

        enc = self.text_encoder
        max_len = min(self.cfg.text.max_length, enc.max_positions)
        tok = enc.tokenizer
        with _bar(len(texts), progress, "text features", "text") as bar, torch.inference_mode():
            for c0 in range(0, len(texts), chunk):
                # Lone surrogates (undecodable bytes kept by the manifest reader) would crash the Rust tokenizer.
                cleaned = [clean_text(t).encode("utf-8", "replace").decode("utf-8") for t in texts[c0 : c0 + chunk]]
                ids = tok(cleaned, truncation=True, max_length=max_len)["input_ids"]
                # Longest first: an out-of-memory error shows on the first batch, not after minutes.
                order = np.argsort(-np.fromiter(map(len, ids), dtype=np.int64, count=len(ids)), kind="stable")
                out = np.empty((len(cleaned), enc.dim), dtype=np.float32)
                start = 0
                while start < len(order):
                    bs = self.text_batch_size
                    sel = order[start : start + bs]
                    try:
                        batch = tok.pad({"input_ids": [ids[i] for i in sel]}, return_tensors="pt",
                                        return_attention_mask=True).to(self.device)
                        with autocast(self.device, self.dtype):
                            hidden = enc.model(**batch)[0]  # last_hidden_state
                        out[sel] = enc.pool(hidden, batch["attention_mask"]).cpu().numpy()
                    except (RuntimeError, MemoryError) as err:
                        self._shrink("text_batch_size", err)
                        continue
                    start += bs
                    bar.update(len(sel))
                yield out


def _bar(total: int, show: bool, desc: str, unit: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not show, file=sys.stderr, desc=desc, unit=unit, dynamic_ncols=True)
