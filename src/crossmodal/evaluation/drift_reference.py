"""The drift reference: what a model's training rows looked like, as ``crossmodal predict`` compares new rows to.

One ``.npz`` (``crossmodal.artifacts.DRIFT_REFERENCE_FILE``), written at publish time and logged with the model's
MLflow run: a seeded sample of at most ``drift.reference_rows`` training rows' frozen image and text embeddings
(the feature store's arrays, the very features a ``FusedModel``'s encoders compute), their ids, the counts of
every training label, and the embedding space they live in.

    from crossmodal.config import EncodersConfig
    from crossmodal.evaluation.drift_reference import read_drift_reference, write_drift_reference
    write_drift_reference("work/validated/validated.parquet", "work/features/image.npy", "work/features/text.npy",
                          "drift_reference.npz", EncodersConfig(), rows=2000, seed=0)
    ref = read_drift_reference("drift_reference.npz")
    ref.image.shape, ref.text.shape, ref.label_counts    # (k, 1280), (k, 384), {"neutral": 362, ...}

Rows keep their NaN rows where a modality is absent (the drift tests skip those). Arrays are plain npy inside the
archive (no pickle); ``meta`` is a JSON string.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crossmodal.config import EncodersConfig
from crossmodal.data.validated import read_validated
from crossmodal.encoders.registry import canonical_name
from crossmodal.errors import DataError
from crossmodal.files import atomic_path

REFERENCE_FORMAT = 1


def embedding_space(encoders: EncodersConfig | dict[str, Any]) -> dict[str, Any]:
    """What makes two embeddings comparable: the encoders and the input sizes they see (not batch size or device;
    precision changes features only by rounding)."""
    enc = encoders if isinstance(encoders, EncodersConfig) else EncodersConfig.model_validate(encoders)
    return {"image": canonical_name(enc.image.name), "image_size": enc.image.image_size,
            "text": canonical_name(enc.text.name), "max_length": enc.text.max_length}


@dataclass
class DriftReference:
    image: np.ndarray  # (k, image_dim) float32, NaN rows where the image is absent
    text: np.ndarray  # (k, text_dim) float32
    ids: list[str]
    label_counts: dict[str, int]  # every training row, not only the sample
    meta: dict[str, Any]  # format, seed, train_rows, embedding space
    # The validation and test rows (a sample, same size limit): how new rows looked to the model when it was made,
    # the null of crossmodal.evaluation.drift.novelty_test; units (group, else id) to resample them by.
    heldout_image: np.ndarray | None = None
    heldout_text: np.ndarray | None = None
    heldout_units: np.ndarray | None = None
    heldout_predicted: np.ndarray | None = None  # the registered head's predicted label per held-out row

    @property
    def space(self) -> dict[str, Any]:
        return self.meta.get("space", {})


def write_drift_reference(validated_path: str | Path, image_features: str | Path, text_features: str | Path,
                          dst: str | Path, encoders: EncodersConfig, rows: int = 2000, seed: int = 0,
                          predicted: dict[str, str] | None = None) -> Path:
    """Sample the ``train`` rows of ``validated_path`` (seeded, at most ``rows``) from the feature arrays (validated
    row order), and as many validation and test rows, and write the reference to ``dst``; returns ``dst``.

    ``predicted``: the registered head's predicted label per held-out row id (its ``predictions.npz``)."""
    frame = read_validated(validated_path, ("id", "label", "split"))
    image = np.load(image_features, mmap_mode="r")
    text = np.load(text_features, mmap_mode="r")
    if len(image) != len(frame) or len(text) != len(frame):
        raise DataError(f"feature arrays {image_features} ({len(image)} rows) and {text_features} ({len(text)} "
                        f"rows) do not match {validated_path} ({len(frame)} rows); re-run `crossmodal extract`")
    train = np.flatnonzero(frame["split"].to_numpy() == "train")
    if not len(train):
        raise DataError(f"{validated_path} has no train rows: no drift reference can be made")
    rng = np.random.default_rng(seed)
    take = train if len(train) <= rows else np.sort(rng.choice(train, size=rows, replace=False))
    labels = frame["label"].to_numpy()[train]
    names, counts = np.unique(labels.astype(str), return_counts=True)
    held = np.flatnonzero(frame["split"].to_numpy() != "train")
    held = held if len(held) <= rows else np.sort(rng.choice(held, size=rows, replace=False))
    ids = frame["id"].to_numpy().astype(str)
    groups = frame["group"].to_numpy() if "group" in frame.columns else np.full(len(frame), None)
    units = np.array([f"g:{g}" if g is not None and g == g and str(g) != "" else f"i:{i}"
                      for g, i in zip(groups[held], ids[held], strict=True)], dtype=str)
    held_predicted = np.array([(predicted or {}).get(i, "") for i in ids[held]], dtype=str)
    meta = {"format": REFERENCE_FORMAT, "seed": int(seed), "rows": int(len(take)), "train_rows": int(len(train)),
            "space": embedding_space(encoders), "source": str(Path(validated_path).resolve())}
    dst = Path(dst)
    with atomic_path(dst) as tmp, open(tmp, "wb") as fh:  # a handle: given a name, savez appends ".npz"
        np.savez(fh, image=np.asarray(image[take], dtype=np.float32), text=np.asarray(text[take], dtype=np.float32),
                 ids=frame["id"].to_numpy()[take].astype(str), label_names=names.astype(str),
                 label_counts=counts.astype(np.int64), meta=np.array(json.dumps(meta, sort_keys=True)),
                 heldout_image=np.asarray(image[held], dtype=np.float32),
                 heldout_text=np.asarray(text[held], dtype=np.float32), heldout_units=units,
                 heldout_predicted=held_predicted)
    return dst


def read_drift_reference(path: str | Path) -> DriftReference:
    """The reference written by :func:`write_drift_reference`; DataError when the file is not one."""
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            held = {k: z[k] for k in ("heldout_image", "heldout_text", "heldout_units", "heldout_predicted")
                    if k in z.files}
            return DriftReference(image=z["image"], text=z["text"], ids=z["ids"].tolist(),
                                  label_counts={str(k): int(v) for k, v in zip(z["label_names"], z["label_counts"])},
                                  meta=meta, **held)
    except (OSError, KeyError, ValueError) as err:
        raise DataError(f"{path} is not a drift reference ({err})") from None

