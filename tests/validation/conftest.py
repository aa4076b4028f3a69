"""Fixtures for the validation tests."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

CONTRACT_COLUMNS = ["id", "image", "text", "label", "split", "group", "image_sha256", "_row"]
QUARANTINE_COLUMNS = ["_row", "id", "image", "text", "label", "split", "group", "reason"]


def _check_validation(res, out: Path):
    """Check what every validation run guarantees (no row lost: rows in = kept + quarantined, each row in exactly one
    table; the contract's columns; unique ids; splits; the report's counts); returns (quarantine, validated, report)."""
    assert res.rows_in == res.rows_kept + res.rows_quarantined
    q = pd.read_csv(Path(out) / "quarantine.csv", dtype=str, keep_default_na=False)
    assert list(q.columns) == QUARANTINE_COLUMNS
    v = pd.read_parquet(res.validated_path)
    assert len(q) == res.rows_quarantined and len(v) == res.rows_kept
    assert sorted(q["_row"].astype(int).tolist() + v["_row"].tolist()) == list(range(res.rows_in))
    assert list(v.columns) == CONTRACT_COLUMNS
    assert set(v["split"]) <= {"train", "val", "test"}
    assert v["id"].is_unique
    report = json.loads(res.report_path.read_text())
    assert report["rows_in"] == res.rows_in and report["rows_kept"] == res.rows_kept
    return q, v, report


@pytest.fixture(scope="session")
def check_validation():
    """``check_validation(result, out_dir)``: assert the invariants of a validation run; returns (quarantine frame,
    validated frame, report)."""
    return _check_validation
