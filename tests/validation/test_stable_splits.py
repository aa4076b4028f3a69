"""Assigned splits survive growth: a row keeps its split when rows are added, removed or reordered."""

from __future__ import annotations

import random

import pandas as pd

from crossmodal.validation.validate import validate_manifest


def _splits(manifest, cfg, out) -> dict[str, str]:
    res = validate_manifest(manifest, cfg, out)
    df = pd.read_parquet(res.validated_path)
    return dict(zip(df["id"], df["split"], strict=True))


def test_grouped_manifest_grown_and_shuffled_keeps_every_shared_row(tmp_path, good_rows, write_csv,
                                                                    validation_config):
    rows = good_rows(tmp_path, n=120, labels=("a", "b", "c"))
    for k, r in enumerate(rows):
        r["group"] = f"item{k // 3}"  # three rows per item
    first = [r for r in rows if int(r["group"][4:]) < 36]  # 90 % of the items
    grown = rows[:]
    random.Random(0).shuffle(grown)
    before = _splits(write_csv(tmp_path / "first.csv", first), validation_config(), tmp_path / "v1")
    after = _splits(write_csv(tmp_path / "all.csv", grown), validation_config(), tmp_path / "v2")
    assert set(before) < set(after)
    assert {i: after[i] for i in before} == before


def test_without_ids_rows_are_split_by_content(tmp_path, good_rows, write_csv, validation_config):
    rows = good_rows(tmp_path, n=60, labels=("a", "b"))
    for r in rows:
        del r["id"]  # ids default to row-<n>, which follow the position
    before = validate_manifest(write_csv(tmp_path / "first.csv", rows[10:]), validation_config(), tmp_path / "v1")
    after = validate_manifest(write_csv(tmp_path / "all.csv", rows[::-1]), validation_config(), tmp_path / "v2")
    key = ["image", "text"]

    def by_content(res):
        df = pd.read_parquet(res.validated_path)
        return dict(zip(zip(*(df[k].map(str) for k in key), strict=True), df["split"], strict=True))

    b, a = by_content(before), by_content(after)
    assert len(b) == 50 and all(a[k] == v for k, v in b.items())
