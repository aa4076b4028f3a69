"""Train/val/test splits: a stratified, grouped, seeded assignment, and the split-name aliases.

``assign_splits`` runs when the manifest has no split column. Rows that share a non-null ``group`` (a poster, a
patient, a product) always land in the same split, so a model cannot score well by recognising a group it saw in
training; rows with a null group are units of their own.

Usage::

    from crossmodal.config import SplitConfig
    from crossmodal.data.split import assign_splits
    df["split"] = assign_splits(df, SplitConfig(seed=42))     # df needs a label column; group is optional

The algorithm is kept simple so that its result can be predicted: each unit is filed under its most common
label; per label (sorted) the units are shuffled with one seeded generator; the first goes to train (so every
class has a train row), then units fill test up to ``round(n * test_fraction)`` rows, then val up to
``round(n * val_fraction)``, and the rest go to train. A class of 2-3 rows thus stays wholly in train.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd

from crossmodal.config import SplitConfig

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "dev": "val", "test": "test", "testing": "test"}


def normalize_split(value: object) -> str | None:
    """Map a user's split value to train/val/test (case-insensitive; "valid", "validation", "dev" -> "val").

    None stays None; an unknown value comes back stripped and lower-cased (so a check for
    membership in SPLITS fails and the reason can quote it).
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    key = str(value).strip().lower()
    return SPLIT_ALIASES.get(key, key)


def _round(x: float) -> int:
    return int(math.floor(x + 0.5))  # half-up: round() would send 2.5 to 2 (banker's rounding)


def assign_splits(df: pd.DataFrame, cfg: SplitConfig | None = None) -> pd.Series:
    """Return a Series (same index as ``df``) of "train"/"val"/"test"; deterministic for a given seed."""
    cfg = cfg or SplitConfig()
    if len(df) == 0:
        return pd.Series([], index=df.index, dtype=object, name="split")
    labels = df["label"].tolist()
    groups = df["group"].tolist() if "group" in df.columns else [None] * len(df)

    # Units in order of first appearance: a group key, or the row position for an ungrouped row.
    unit_rows: dict[object, list[int]] = {}
    for pos, g in enumerate(groups):
        key = ("g", str(g)) if g is not None and not (isinstance(g, float) and math.isnan(g)) else ("r", pos)
        unit_rows.setdefault(key, []).append(pos)

    by_label: dict[str, list[object]] = {}
    for key, rows in unit_rows.items():
        if len(rows) == 1:  # an ungrouped row (most rows): its own label, without a Counter per row
            by_label.setdefault(str(labels[rows[0]]), []).append(key)
            continue
        counts = Counter(str(labels[p]) for p in rows)
        top = max(counts.values())
        primary = min(lab for lab, c in counts.items() if c == top)  # ties -> alphabetical, for determinism
        by_label.setdefault(primary, []).append(key)

    rng = np.random.default_rng(cfg.seed)
    out = np.empty(len(df), dtype=object)
    for label in sorted(by_label):
        units = by_label[label]
        order = rng.permutation(len(units))
        n = sum(len(unit_rows[u]) for u in units)
        target = {"test": _round(n * cfg.test_fraction), "val": _round(n * cfg.val_fraction)}
        filled = {"train": 0, "val": 0, "test": 0}
        for i, idx in enumerate(order):
            rows = unit_rows[units[idx]]
            if i == 0:
                split = "train"
            elif filled["test"] < target["test"]:
                split = "test"
            elif filled["val"] < target["val"]:
                split = "val"
            else:
                split = "train"
            filled[split] += len(rows)
            if len(rows) == 1:
                out[rows[0]] = split  # scalar store: most units are one row, and fancy indexing per row is slow
            else:
                out[rows] = split
    return pd.Series(out, index=df.index, dtype=object, name="split")
