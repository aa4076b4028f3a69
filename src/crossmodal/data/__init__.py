"""Data sources: manifests (CSV / JSON Lines / Parquet), splits, and the embedded demo dataset.

Usage::

    from crossmodal.data import read_manifest, assign_splits, generate_demo, DataError
"""

from __future__ import annotations

from crossmodal.data.demo import generate_demo
from crossmodal.data.manifest import CANONICAL, DataError, read_manifest
from crossmodal.data.split import SPLITS, assign_splits, normalize_split

__all__ = ["CANONICAL", "SPLITS", "DataError", "assign_splits", "generate_demo", "normalize_split", "read_manifest"]
