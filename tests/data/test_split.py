"""assign_splits: a row's split is a function of its group (or id) and the seed alone; grouped; close fractions."""

from __future__ import annotations

import pandas as pd
import pytest

from crossmodal.config import SplitConfig
from crossmodal.data.split import assign_splits, normalize_split, unit_position


def frame(n: int = 600, n_groups: int = 120, labels=("a", "b", "c")) -> pd.DataFrame:
    return pd.DataFrame({"id": [f"r{i}" for i in range(n)], "label": [labels[i % len(labels)] for i in range(n)],
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


def test_growing_shrinking_or_reordering_never_moves_a_row():
    full = frame(n=2000, n_groups=400)
    full["split"] = assign_splits(full, SplitConfig(seed=3))
    first = full[full["group"].isin([f"g{i}" for i in range(360)])].drop(columns="split")  # 90 % of the groups
    first = first.assign(split=assign_splits(first, SplitConfig(seed=3)))
    assert first["split"].tolist() == full.loc[first.index, "split"].tolist()
    shuffled = full.drop(columns="split").sample(frac=1.0, random_state=0)
    assert assign_splits(shuffled, SplitConfig(seed=3)).tolist() == full.loc[shuffled.index, "split"].tolist()


def test_ungrouped_rows_are_keyed_by_id_not_position():
    df = frame(60, 12)
    df["group"] = None
    before = assign_splits(df, SplitConfig(seed=0))
    moved = pd.concat([df.iloc[30:], df.iloc[:30]])
    assert assign_splits(moved, SplitConfig(seed=0)).to_dict() == before.to_dict()
    # A group named like a row's id is not that row's unit.
    assert unit_position("g:r1", 0) != unit_position("i:r1", 0)


def test_fractions_hold_in_expectation():
    df = frame(n=4000, labels=("a", "b"))
    df["group"] = None
    df["split"] = assign_splits(df, SplitConfig(val_fraction=0.2, test_fraction=0.1, seed=0))
    share = df.groupby(["label", "split"]).size().unstack().div(2000)
    for lab in ("a", "b"):  # 3 standard errors on 2,000 rows: about 0.02
        assert share.loc[lab, "test"] == pytest.approx(0.1, abs=0.025)
        assert share.loc[lab, "val"] == pytest.approx(0.2, abs=0.03)


def test_grouped_fractions_are_close():
    df = frame(n=1500, n_groups=300)
    share = assign_splits(df, SplitConfig()).value_counts(normalize=True)
    assert share["test"] == pytest.approx(0.15, abs=0.07) and share["val"] == pytest.approx(0.15, abs=0.07)


def test_unit_position_is_uniform_and_seeded():
    pos = [unit_position(f"i:{k}", 7) for k in range(5000)]
    assert all(0.0 <= p < 1.0 for p in pos)
    assert sum(p < 0.5 for p in pos) == pytest.approx(2500, abs=150)
    assert unit_position("i:1", 7) != unit_position("i:1", 8)


@pytest.mark.parametrize("raw,expected", [("train", "train"), (" TRAIN ", "train"), ("Valid", "val"),
                                          ("validation", "val"), ("val", "val"), ("Test", "test"),
                                          (None, None), ("holdout", "holdout")])
def test_normalize_split(raw, expected):
    assert normalize_split(raw) == expected
