"""Train/val/test splits: a stable, grouped, seeded assignment, and the split-name aliases.

``assign_splits`` runs when the manifest has no split column. A row's split is a pure function of its unit (its
``group`` when it has one, else its ``id``) and ``data.split.seed``: a keyed hash of the unit, read as a number in
[0, 1), lands in test below ``test_fraction``, in val below ``test_fraction + val_fraction``, in train above. So:

- rows that share a group (a poster, a patient, a product) always land in the same split;
- adding, removing or reordering other rows never moves a row between splits, so a model retrained on grown data
  is tested on rows its predecessor never saw, apart from the old test rows it keeps (the gate compares on those);
- the fractions and the stratification by label hold only in expectation: on n units a split's share varies by
  about ``sqrt(f (1 - f) / n)``, and a class of a few units can miss a split, train included. Validation reports
  the per-class counts of each split (``validation.json``: ``split_counts``) and warns about a class with no train
  rows; give the manifest a split column where exact counts matter.

Usage::

    from crossmodal.config import SplitConfig
    from crossmodal.data.split import assign_splits
    df["split"] = assign_splits(df, SplitConfig(seed=42))     # df needs an id column; group is optional
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pandas as pd

from crossmodal.config import SplitConfig

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}
SPLIT_SCHEME = "keyed-hash-v1"  # recorded with the validated data; a new scheme must get a new name


def normalize_split(value: object) -> str | None:
    """Map a user's split value to train/val/test (case-insensitive; "valid", "validation", "dev" -> "val").

    None stays None; an unknown value comes back stripped and lower-cased (so a check for
    membership in SPLITS fails and the reason can quote it).
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    key = str(value).strip().lower()
    return SPLIT_ALIASES.get(key, key)


def _absent(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or str(value) == ""


def unit_position(unit: str, seed: int) -> float:
    """Where a unit falls in [0, 1) for ``seed``: blake2b keyed by the seed, so seeds give unrelated splits."""
    h = hashlib.blake2b(unit.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode())
    return int.from_bytes(h.digest(), "big") / 2.0**64


def split_units(df: pd.DataFrame) -> list[str]:
    """Each row's unit: ``"g:<group>"`` when it has a group, else ``"i:<id>"`` (so a group named like some row's
    id stays apart from that row). Rows of one unit share a split, and are one piece of evidence, not several."""
    ids = df["id"].tolist()
    groups = df["group"].tolist() if "group" in df.columns else [None] * len(df)
    return [f"i:{i}" if _absent(g) else f"g:{g}" for g, i in zip(groups, ids, strict=True)]


def assign_splits(df: pd.DataFrame, cfg: SplitConfig | None = None) -> pd.Series:
    """Return a Series (same index as ``df``) of "train"/"val"/"test": each row's from its unit and the seed alone."""
    cfg = cfg or SplitConfig()
    if len(df) == 0:
        return pd.Series([], index=df.index, dtype=object, name="split")
    codes, uniques = pd.factorize(pd.Series(split_units(df), dtype=object))
    position = np.fromiter((unit_position(u, cfg.seed) for u in uniques), dtype=np.float64, count=len(uniques))
    per_unit = np.where(position < cfg.test_fraction, "test",
                        np.where(position < cfg.test_fraction + cfg.val_fraction, "val", "train")).astype(object)
    return pd.Series(per_unit[codes], index=df.index, dtype=object, name="split")
