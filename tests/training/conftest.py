"""Fixtures for the training tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest


def _write_inputs(root: Path, n: int = 150, labels: tuple[str, ...] = ("cat", "dog", "bird"), seed: int = 0):
    """What train_all reads, under ``root``: validated.parquet (ids id0, id1, ...; splits train/val/test in turn,
    40/40/20) and image.npy (10 features) and text.npy (6 features), both telling the label apart.
    Returns the three paths and the table."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(labels), n)
    image = (rng.normal(size=(n, 10)) + 2 * np.eye(len(labels), 10)[y]).astype(np.float32)
    text = (rng.normal(size=(n, 6)) + 2 * np.eye(len(labels), 6)[y]).astype(np.float32)
    split = np.array(["train", "val", "test"])[np.arange(n) % 5 % 3]  # 40/40/20, every split has rows
    df = pd.DataFrame({"id": [f"id{i}" for i in range(n)], "label": [labels[k] for k in y], "split": split})
    return _save_inputs(root, df, image, text), df


def _save_inputs(root: Path, df: pd.DataFrame, image: np.ndarray, text: np.ndarray):
    """``df`` as validated.parquet and the two feature arrays as image.npy and text.npy under ``root``; their paths."""
    root.mkdir(parents=True, exist_ok=True)
    paths = root / "validated.parquet", root / "image.npy", root / "text.npy"
    df.to_parquet(paths[0])
    np.save(paths[1], image)
    np.save(paths[2], text)
    return paths


@pytest.fixture(scope="session")
def save_inputs():
    """``save_inputs(root, table, image, text)``: train_all's input files from a table and feature arrays you built;
    returns (validated.parquet, image.npy, text.npy)."""
    return _save_inputs


@pytest.fixture(scope="session")
def write_inputs():
    """``write_inputs(root, n=150, labels=("cat", "dog", "bird"), seed=0)``: train_all's input files; returns
    ((validated.parquet, image.npy, text.npy), the table)."""
    return _write_inputs
