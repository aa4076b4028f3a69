"""``--force`` for the extract stage: every item is encoded again and the new features replace the store's, shelf
chunks and assembled arrays alike. A stand-in extractor stamps each call's features, so the tests can tell which
run encoded the features the store serves."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crossmodal.config import Config
from crossmodal.features import extract
from crossmodal.features.extract import extract_features, shelf_dirs
from crossmodal.pipeline.stages import force_extract

ROWS = 20
_stamps = itertools.count(1)


class Stamping:
    """In place of FeatureExtractor: features from each input's content plus the number of the call (all instances
    count together); ``encoded`` lists every input it was given, across instances."""

    image_dim, text_dim, device = 5, 3, "cpu"
    encoded: list = []

    def __init__(self, cfg):
        self.cfg = cfg

    def _feats(self, inputs: list[bytes], dim: int):
        stamp = next(_stamps)
        Stamping.encoded += inputs
        rows = [np.random.default_rng(int.from_bytes(hashlib.sha256(x).digest()[:8], "little")).standard_normal(dim)
                for x in inputs]
        yield (np.stack(rows) + stamp).astype(np.float32)

    def iter_image_features(self, sources, progress=False, names=None):
        return self._feats([Path(p).read_bytes() for p in sources], self.image_dim)

    def iter_text_features(self, texts, progress=False, chunk=4096):
        return self._feats([t.encode() for t in texts], self.text_dim)


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setattr(extract, "FeatureExtractor", Stamping)  # what extract_features builds when it must encode
    monkeypatch.setattr(Stamping, "encoded", [])
    rows = []
    for i in range(ROWS):
        path = tmp_path / f"img{i}.bin"
        path.write_bytes(f"image {i}".encode())
        rows.append({"id": f"r{i}", "image": str(path), "text": f"caption {i}", "label": "ab"[i % 2],
                     "split": "train", "image_sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    table = tmp_path / "validated.parquet"
    pd.DataFrame(rows).to_parquet(table)
    cfg = Config.model_validate({"encoders": {"precision": "fp32", "device": "cpu"}})
    return table, cfg, tmp_path / "cache"


def test_force_encodes_everything_and_replaces_the_store(setup):
    table, cfg, cache = setup
    half = table.with_name("half.parquet")
    pd.read_parquet(table).iloc[:7].to_parquet(half)
    extract_features(half, cfg.encoders, cache, progress=False)  # the store grown in two steps: other chunks
    normal = extract_features(table, cfg.encoders, cache, progress=False)
    assert normal.encoded == {"image": ROWS - 7, "text": ROWS - 7}
    shelf = shelf_dirs(cache, cfg.encoders, "fp32")["image"]
    old_chunks = {p.name for p in shelf.glob("*.keys")}
    assert len(old_chunks) == 2
    before = np.load(normal.image_path), np.load(normal.text_path)

    Stamping.encoded.clear()
    forced = force_extract(table, cfg, cache)
    assert forced["encoded"] == {"image": ROWS, "text": ROWS} and forced["reused"] == {"image": 0, "text": 0}
    assert len(Stamping.encoded) == 2 * ROWS
    assert (forced["image_key"], forced["text_key"]) == (normal.image_key, normal.text_key)
    assert Path(forced["image_path"]) == normal.image_path.resolve()  # swapped in where the normal run finds it
    img = np.load(forced["image_path"])
    assert (img != before[0]).all() and (np.load(forced["text_path"]) != before[1]).all()  # encoded anew

    # The store now serves the forced features, from the assembled array and from the shelf alike.
    again = extract_features(table, cfg.encoders, cache, progress=False)
    assert again.computed == {"image": False, "text": False}
    np.testing.assert_array_equal(np.load(again.image_path), img)
    Stamping.encoded.clear()
    pd.read_parquet(table).iloc[::-1].to_parquet(table.with_name("reversed.parquet"))
    rev = extract_features(table.with_name("reversed.parquet"), cfg.encoders, cache, progress=False)
    assert rev.encoded == {"image": 0, "text": 0} and not Stamping.encoded
    np.testing.assert_array_equal(np.load(rev.image_path), img[::-1])
    # The chunks the forced ones replaced are gone; nothing of the private store is left.
    chunks = {p.name for p in shelf.glob("*.keys")}
    assert len(chunks) == 1 and not chunks & old_chunks
    assert not list((cache / "stages" / "extract").iterdir())
