"""Extraction reports how far it is: per kind, distinct items ready (from the store or encoded) of the total, at the
start and after each encoded batch; a cache hit reports the kind done at once."""

from __future__ import annotations

import hashlib

import pandas as pd

from crossmodal.features.extract import extract_features


def _table(tmp_path, n: int):
    rows = []
    for i in range(n):
        path = tmp_path / f"img{i}.bin"
        path.write_bytes(f"image {i}".encode())
        rows.append({"id": f"r{i}", "image": str(path), "text": f"caption {i}", "label": "ab"[i % 2],
                     "split": "train", "image_sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return rows


def test_progress_counts_stored_and_encoded_items(tmp_path, encoders_config, counting_extractor):
    cfg = encoders_config(precision="fp32")
    rows = _table(tmp_path, 10)
    first = tmp_path / "first.parquet"
    pd.DataFrame(rows[:4]).to_parquet(first)
    extract_features(first, cfg, tmp_path / "cache", progress=False, extractor=counting_extractor(cfg, batch=3))

    grown = tmp_path / "grown.parquet"
    pd.DataFrame(rows).to_parquet(grown)
    seen: list[tuple[str, int, int]] = []
    extract_features(grown, cfg, tmp_path / "cache", progress=False, extractor=counting_extractor(cfg, batch=3),
                     on_progress=lambda kind, done, total: seen.append((kind, done, total)))
    # 4 items were in the store; the 6 new ones come in batches of 3.
    assert [s for s in seen if s[0] == "image"] == [("image", 4, 10), ("image", 7, 10), ("image", 10, 10)]
    assert [s for s in seen if s[0] == "text"] == [("text", 4, 10), ("text", 7, 10), ("text", 10, 10)]

    again: list[tuple[str, int, int]] = []
    extract_features(grown, cfg, tmp_path / "cache", progress=False, extractor=counting_extractor(cfg),
                     on_progress=lambda kind, done, total: again.append((kind, done, total)))
    assert again == [("image", 10, 10), ("text", 10, 10)]  # the assembled arrays are served whole
