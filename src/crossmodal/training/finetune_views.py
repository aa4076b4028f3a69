"""Fine-tuning's augmented views: K views of each training row, run through the frozen layers once, cached on disk.

    from crossmodal.training.finetune_views import train_views
    pool = train_views(model, rows, base, ft, cfg.train.augment, ckpt_root, dtype)   # Inputs, (K + 1) * n rows
    pool.batch(view * n + row, device)        # row ``row`` of the training set as view ``view`` (0: itself)

The frozen layers never change during fine-tuning, so a view's frozen-layer output (the image grid before the tuned
blocks, the text states before the tuned layers; ``crossmodal.heads.xattn``) is computed once, like the rows' own,
and each epoch only the tuned layers run on whichever view a row is drawn as. Views come from
``crossmodal.data.augment``, seeded by content and view, and their outputs are kept in two shelves
(``crossmodal.features.shelf``) under ``<checkpoint root>/views/``: images keyed by (image sha256, view) in a shelf
named by the image encoder, input size, first tuned block, precision and the image augmentation settings; texts
keyed by the augmented text itself (its frozen-layer output depends on nothing else) in a shelf named by the text
encoder, token budget, first tuned layer and precision. So a rerun, a resumed run and a run with other learning
rates, epochs or head settings find them there, and only new rows or new settings cost a pass through the frozen
layers.

With text augmentation off (``train.augment.text``'s rates all 0, the default) every text view is the row's own
text, so the views reuse the rows' own token ids and frozen text states and no text is run again.

Where the model has no frozen prefix for a modality (every block tuned, or text layers that do not replay), that
modality's views are kept as raw inputs (pixels, token ids) instead and run through the whole tower each step.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch

from crossmodal.config import AugmentConfig, FinetuneConfig
from crossmodal.data.augment import UNK, image_view, text_key, text_view, view_seed
from crossmodal.data.manifest import is_absent
from crossmodal.errors import FinetuneError
from crossmodal.features.shelf import Shelf, distinct, text_keys
from crossmodal.hardware import autocast, precision_name
from crossmodal.heads.xattn import FinetunedXattn
from crossmodal.heads.xattn_inputs import Inputs

log = logging.getLogger(__name__)

VIEWS_VERSION = 1  # bump when a view's frozen-layer output changes for the same key: old shelves then go unused
VIEWS_DIR = "views"
CHUNK_ROWS = 512  # new items per shelf chunk


def shelf_dir(root: Path, kind: str, header: dict) -> Path:
    return Path(root) / VIEWS_DIR / kind / hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def train_views(model: FinetunedXattn, images: list, texts: list, image_sha: list, names: list[str], base: Inputs,
                ft: FinetuneConfig, augment: AugmentConfig, root: Path, dtype: torch.dtype | None,
                max_pixels: int | None = None) -> Inputs:
    """``base`` (the n training rows, frozen outputs cached) followed by their ``augment.views`` views, view-major.

    ``images``, ``texts``, ``image_sha``, ``names``: the training rows' cells, in ``base``'s order; ``root``: the
    checkpoint root (the shelves go under ``root/views/``). Views missing from the shelves are computed here.
    """
    n, k = len(base), augment.views
    device = next(model.head.parameters()).device
    precision = precision_name(dtype)
    max_length = int(base.input_ids.shape[1])
    size = int(ft.image_size)
    tokenizer = model.text.tokenizer
    unk = getattr(tokenizer, "unk_token", None) or UNK

    text = augment.text
    text_off = text.token_dropout == text.deletion == text.swap == 0  # the default: every text view is the text
    if text_off:
        ids, mask = base.input_ids.repeat(k, 1), base.attention_mask.repeat(k, 1)
    else:
        cleaned = _cleaned(texts)
        aug_texts = [text_view(t, text, view_seed(text_key(t), v, augment.seed), v, unk) if t else ""
                     for v in range(1, k + 1) for t in cleaned]
        enc = tokenizer(aug_texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()

    text_prefix = None
    if base.text_prefix is not None and text_off:
        text_prefix = base.text_prefix.repeat(k, *([1] * (base.text_prefix.dim() - 1)))
    elif base.text_prefix is not None:
        header = {"v": VIEWS_VERSION, "kind": "text", "encoder": model.init_args["text_encoder"],
                  "max_length": max_length, "first_tuned": model.text.first_tuned, "precision": precision}
        present = np.flatnonzero([bool(t) for t in aug_texts])
        keys = text_keys([aug_texts[i] for i in present])

        def text_batch(rows: np.ndarray) -> torch.Tensor:
            i = torch.from_numpy(present[rows])
            return model.text.frozen_prefix(ids[i].to(device), mask[i].to(device))

        flat = _from_shelf(shelf_dir(root, "text", header), header, keys, text_batch, ft.batch_size * 2, device,
                           dtype, "text")
        text_prefix = torch.zeros((k * n, *base.text_prefix.shape[1:]), dtype=torch.float32)
        text_prefix[torch.from_numpy(present)] = flat.view(len(present), *base.text_prefix.shape[1:])

    image_present = np.flatnonzero(~base.image_missing.numpy())
    decoded: dict[int, torch.Tensor] = {}

    def pixels_of(row: int, view: int) -> torch.Tensor:
        from crossmodal.data.images import ImageError, load_image

        if row not in decoded:
            src = images[row]
            try:
                img = load_image(bytes(src) if isinstance(src, bytearray) else src, max_pixels)
            except ImageError as err:
                raise ImageError(f"{names[row]}: {err}") from None
            decoded[row] = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
        return image_view(decoded[row], size, augment.image, view_seed(image_sha[row], view, augment.seed), view)

    image_prefix = None
    if base.image_prefix is not None:
        header = {"v": VIEWS_VERSION, "kind": "image", "encoder": model.init_args["image_encoder"],
                  "image_size": size, "first_tuned": model.image.first_tuned, "precision": precision,
                  "augment": augment.image.model_dump(mode="json"), "seed": augment.seed}
        items = [(v, int(r)) for v in range(1, k + 1) for r in image_present]
        keys = np.frombuffer(b"".join(hashlib.sha256(bytes.fromhex(image_sha[r]) + v.to_bytes(4, "little")).digest()
                                      for v, r in items), dtype=np.uint8).reshape(len(items), 32)

        def image_batch(rows: np.ndarray) -> torch.Tensor:
            x = torch.stack([pixels_of(items[i][1], items[i][0]) for i in rows])
            return model.image.frozen_prefix(x.to(device))

        flat = _from_shelf(shelf_dir(root, "image", header), header, keys, image_batch, ft.batch_size * 2, device,
                           dtype, "image")
        image_prefix = torch.zeros((k * n, *base.image_prefix.shape[1:]), dtype=torch.float32)
        at = torch.tensor([(v - 1) * n + r for v, r in items], dtype=torch.long)
        image_prefix[at] = flat.view(len(items), *base.image_prefix.shape[1:])
        pixels = None
    else:  # the whole image tower trains: the views stay pixels
        pixels = torch.zeros((k * n, 3, size, size), dtype=torch.uint8)
        for v in range(1, k + 1):
            for r in image_present:
                pixels[(v - 1) * n + int(r)] = pixels_of(int(r), v)
    decoded.clear()

    def both(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
        return None if a is None or b is None else torch.cat([a, b])

    total = (k + 1) * n
    if base.image_prefix is not None:
        # The model starts from the prefix and never reads these pixels: one zero image stands in for all of them.
        all_pixels = torch.zeros((1, 3, size, size), dtype=torch.uint8).expand(total, -1, -1, -1)
    else:
        all_pixels = torch.cat([base.pixels, pixels])
    pool = Inputs(all_pixels, torch.cat([base.input_ids, ids]), torch.cat([base.attention_mask, mask]),
                  base.image_missing.repeat(k + 1), base.text_missing.repeat(k + 1))
    pool.image_prefix = both(base.image_prefix, image_prefix)
    pool.text_prefix = both(base.text_prefix, text_prefix)
    return pool


def _cleaned(texts: list) -> list[str]:
    """The texts as ``prepare_inputs`` tokenizes them ("" where absent)."""
    from crossmodal.data.text import clean_text

    return ["" if is_absent(t) else clean_text(t).encode("utf-8", "replace").decode("utf-8") for t in texts]


@torch.inference_mode()
def _from_shelf(folder: Path, header: dict, keys: np.ndarray, compute, batch_size: int, device: torch.device,
                dtype: torch.dtype | None, kind: str) -> torch.Tensor:
    """float32 (len(keys), dim): each item's frozen output from the shelf in ``folder``, computing what it lacks.

    ``compute(rows)`` returns the outputs of items ``rows`` (indices into ``keys``), any shape per item."""
    if len(keys) == 0:
        return torch.zeros((0, 0), dtype=torch.float32)
    first, code = distinct(keys)
    folder.mkdir(parents=True, exist_ok=True)
    shelf = Shelf.open(folder)
    try:
        chunk, row = shelf.find(keys[first])
        todo = np.flatnonzero(chunk < 0)
        log.info("%s views: %d distinct, %d from the cache %s, computing %d", kind, len(first), len(first) - len(todo),
                 folder, len(todo))
        for c0 in range(0, len(todo), CHUNK_ROWS):
            part = todo[c0 : c0 + CHUNK_ROWS]
            outs = []
            for b0 in range(0, len(part), batch_size):
                with autocast(device, dtype):
                    outs.append(compute(first[part[b0 : b0 + batch_size]]).float().flatten(1).cpu())
            block = torch.cat(outs).numpy()
            try:
                chunk[part] = shelf.add(keys[first[part]], block)
            except OSError as err:
                raise FinetuneError(f"cannot write the {kind} views' cache {folder} ({err}); free some space there "
                                    "or set train.finetune.checkpoint_dir to another folder") from None
            row[part] = np.arange(len(part))
        if shelf.dim is not None:
            shelf.describe(header)
        out = np.empty((len(first), shelf.dim), dtype=np.float32)
        for c in np.unique(chunk):
            sel = np.flatnonzero(chunk == c)
            out[sel] = shelf.rows(int(c))[row[sel]]
    finally:
        shelf.close()
    return torch.from_numpy(out[code])
