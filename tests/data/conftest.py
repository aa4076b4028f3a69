"""Fixtures for the data tests (the image and manifest writers shared with other folders: tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


def _write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.fixture(scope="session")
def write_parquet():
    """``write_parquet(path, rows)``: a Parquet manifest."""
    return _write_parquet
