"""assign_splits: deterministic, stratified, grouped; small classes keep a train row."""

from __future__ import annotations

import pandas as pd
import pytest

from crossmodal.config import SplitConfig
from crossmodal.data.split import assign_splits, normalize_split


def frame(n: int = 600, n_groups: int = 120, labels=("a", "b", "c")) -> pd.DataFrame:
    return pd.DataFrame({"label": [labels[i % len(labels)] for i in range(n)],
                         "group": [f"g{(i * 7) % n_groups}" for i in range(n)]}, dtype=object)


def test_deterministic_by_seed():
    df = frame()
    a, b = assign_splits(df, SplitConfig(seed=1)), assign_splits(df, SplitConfig(seed=1))
    assert a.tolist() == b.tolist()
    assert a.tolist() != assign_splits(df, SplitConfig(seed=2)).tolist()
    assert a.index.equals(df.index)


def test_groups_never_straddle_splits():
    df = frame()
    df["split"] = assign_splits(df, SplitConfig(seed=5))
    assert (df.groupby("group")["split"].nunique() == 1).all()


def test_fractions_and_stratification_without_groups():
    df = frame(n=1000, labels=("a", "b"))
    df["group"] = None
    df["split"] = assign_splits(df, SplitConfig(val_fraction=0.2, test_fraction=0.1, seed=0))
    counts = df.groupby(["label", "split"]).size().unstack()
    for lab in ("a", "b"):
        assert counts.loc[lab, "test"] == 50 and counts.loc[lab, "val"] == 100 and counts.loc[lab, "train"] == 350


def test_grouped_fractions_are_close():
    df = frame(n=1500, n_groups=300)
    share = assign_splits(df, SplitConfig()).value_counts(normalize=True)
    assert share["test"] == pytest.approx(0.15, abs=0.04) and share["val"] == pytest.approx(0.15, abs=0.04)


def test_small_classes_keep_a_train_row():
    df = pd.DataFrame({"label": ["big"] * 40 + ["two", "two", "one"], "group": [None] * 43}, dtype=object)
    for seed in range(10):
        s = assign_splits(df, SplitConfig(seed=seed))
        assert (s[df["label"] == "two"] == "train").any()
        assert s[df["label"] == "one"].tolist() == ["train"]
        assert set(s[df["label"] == "big"]) == {"train", "val", "test"}


def test_row_order_independent_of_index_labels():
    df = frame(60, 12)
    shifted = df.set_axis(range(100, 160))
    assert assign_splits(df, SplitConfig()).tolist() == assign_splits(shifted, SplitConfig()).tolist()


@pytest.mark.parametrize("raw,expected", [("train", "train"), (" TRAIN ", "train"), ("Valid", "val"),
                                          ("validation", "val"), ("val", "val"), ("Test", "test"),
                                          (None, None), ("holdout", "holdout")])
def test_normalize_split(raw, expected):
    assert normalize_split(raw) == expected
