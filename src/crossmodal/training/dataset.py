"""Training data: the features and labels of validated rows, cut by split, checked before any head trains.

    from crossmodal.training.dataset import load_split_features
    data, labels = load_split_features("validated.parquet", "image.npy", "text.npy")
    data.image["train"], data.y["val"], data.ids["test"]     # float32 / int64 / str arrays per split
    data, _ = load_split_features(..., views=extract_views(...).to_dict())   # + data.views["image"]: (K, n_train, Di)

An all-NaN feature row is an absent modality; any other NaN or inf, a row count that does not match the table, or
fewer than two labels is a TrainError that says what to re-run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crossmodal.data.split import SPLITS, split_units
from crossmodal.data.validated import read_validated
from crossmodal.errors import TrainError


@dataclass
class SplitFeatures:
    """Features and integer labels per split: ``image["train"]`` is (n_train, Di) float32, and so on."""

    image: dict[str, np.ndarray]
    text: dict[str, np.ndarray]
    y: dict[str, np.ndarray]
    ids: dict[str, np.ndarray] = field(default_factory=dict)
    # Each row's split unit (its group, else its id): rows of one unit are not independent evidence.
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    # Standardize statistics of the train features per modality, computed once for every head trained on this
    # data (crossmodal.heads.registry.fit_standardizers); the arrays are not to be changed in place once wrapped here.
    statistics: dict = field(default_factory=dict, repr=False, compare=False)
    # Augmented views of the training rows (``crossmodal.features.extract.extract_views``): per modality float32
    # (K, n_train, D), view k of each training row in ``image["train"]``'s order; empty without views.
    views: dict[str, np.ndarray] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_arrays(cls, image, text, y, split, ids=None, groups=None) -> SplitFeatures:
        """Cut row-aligned arrays by a split column ("train" / "val" / "test" per row); ``groups`` defaults to
        the ids (every row its own unit)."""
        image, text = np.asarray(image, dtype=np.float32), np.asarray(text, dtype=np.float32)
        y, split = np.asarray(y, dtype=np.int64), np.asarray(split).astype(str)
        ids = np.asarray([f"row-{i}" for i in range(len(y))] if ids is None else ids).astype(str)
        groups = ids if groups is None else np.asarray(groups).astype(str)
        if image.ndim != 2 or text.ndim != 2:
            raise TrainError(f"features must be 2-D (rows, dims); got image {image.shape}, text {text.shape}")
        if not len(image) == len(text) == len(y) == len(split) == len(ids) == len(groups):
            raise TrainError(
                f"row counts differ: image {len(image)}, text {len(text)}, labels {len(y)}, splits {len(split)}, "
                f"ids {len(ids)}, groups {len(groups)}"
            )
        unknown = sorted(set(split) - set(SPLITS))
        if unknown:
            raise TrainError(f"unknown split value(s) {unknown}; expected one of {list(SPLITS)}")
        masks = {s: split == s for s in SPLITS}
        return cls(
            image={s: image[m] for s, m in masks.items()},
            text={s: text[m] for s, m in masks.items()},
            y={s: y[m] for s, m in masks.items()},
            ids={s: ids[m] for s, m in masks.items()},
            groups={s: groups[m] for s, m in masks.items()},
        )

    @property
    def image_dim(self) -> int:
        return int(self.image["train"].shape[1])

    @property
    def text_dim(self) -> int:
        return int(self.text["train"].shape[1])


def load_split_features(validated_path, image_features_path, text_features_path,
                        views: dict | None = None) -> tuple[SplitFeatures, list[str]]:
    """Read validated.parquet and the two feature files (rows aligned) into a SplitFeatures + sorted labels.

    ``views``: ``ViewResult.to_dict()`` of the same table (its ``image_path`` and ``text_path``), read into
    ``data.views``."""
    df = read_validated(validated_path, ("id", "label", "split"), TrainError)

    feats = {}
    for kind, path in (("image", image_features_path), ("text", text_features_path)):
        path = Path(path)
        if not path.is_file():
            raise TrainError(f"{kind} features {path} not found; run `crossmodal extract` first")
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # the splits below are copies: no second copy
        if arr.ndim != 2 or len(arr) != len(df):
            raise TrainError(
                f"{kind} features {path} have shape {arr.shape} but {validated_path} has {len(df)} rows; "
                "the features are stale: re-run `crossmodal extract`"
            )
        # An all-NaN row is an absent modality (validation.allow_missing); anything else non-finite is damage.
        absent = np.isnan(arr).all(axis=1)
        bad = ~np.isfinite(arr).all(axis=1) & ~absent
        if bad.any():
            first = df["id"].iloc[int(np.argmax(bad))]
            raise TrainError(
                f"{kind} features {path} hold NaN/inf in {int(bad.sum())} row(s), first id {first!r}; "
                "re-run `crossmodal extract` (and check that row's input)"
            )
        feats[kind] = arr.astype(np.float32, copy=False)
    both = np.isnan(feats["image"]).all(axis=1) & np.isnan(feats["text"]).all(axis=1)
    if both.any():
        raise TrainError(f"row id {df['id'].iloc[int(np.argmax(both))]!r} has neither image nor text features; "
                         "re-run `crossmodal validate` and `crossmodal extract`")

    labels_str = df["label"].astype(str)
    labels = sorted(labels_str.unique())
    if len(labels) < 2:
        raise TrainError(f"{validated_path} has {len(labels)} label(s) {labels}; a classifier needs at least 2")
    y = labels_str.map({label: i for i, label in enumerate(labels)}).to_numpy(np.int64)
    split, ids = df["split"].astype(str).to_numpy(), df["id"].astype(str).to_numpy()
    data = SplitFeatures.from_arrays(feats["image"], feats["text"], y, split, ids, split_units(df))
    if views:
        data.views = _load_views(views, data, validated_path)
    return data, labels


def _load_views(views: dict, data: SplitFeatures, validated_path) -> dict[str, np.ndarray]:
    out = {}
    for kind in ("image", "text"):
        path = Path(views[f"{kind}_path"])
        if not path.is_file():
            raise TrainError(f"{kind} views {path} not found; run `crossmodal extract` again (train.augment)")
        arr = np.load(path, allow_pickle=False)
        want = (len(data.y["train"]), getattr(data, f"{kind}_dim"))
        if arr.ndim != 3 or arr.shape[1:] != want:
            raise TrainError(f"{kind} views {path} have shape {arr.shape} but {validated_path} has {want[0]} train "
                             f"rows of {want[1]} features; the views are stale: run `crossmodal extract` again")
        out[kind] = arr.astype(np.float32, copy=False)
    return out
