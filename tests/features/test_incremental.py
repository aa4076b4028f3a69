"""The per-item feature store: a grown table encodes only its new items, a reordered or shrunk one nothing, a crashed
run resumes from its chunks, absent inputs stay NaN. A counting stand-in extractor stamps each call's features, so
a row equal to the bit to an earlier run's row was read from the store, not encoded again."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pandas as pd
import pytest

from crossmodal.features import extractor as embed
from crossmodal.features.extract import extract_features, shelf_dirs
from crossmodal.features.shelf import Shelf, replace_shelf

CHUNK = 4
BASE = 30  # rows of the first table


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> list[dict]:
    """60 rows of distinct images (small files; the stand-in reads their bytes) and texts; in the first 30, row 29
    repeats row 0's image and row 7 row 3's text."""
    root = tmp_path_factory.mktemp("items")
    out = []
    for i in range(60):
        path = root / f"img{i}.bin"
        path.write_bytes(f"image {0 if i == 29 else i}".encode())
        out.append({"id": f"r{i}", "image": str(path), "text": f"caption {3 if i == 7 else i}", "label": "ab"[i % 2],
                    "split": "train", "image_sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    return out


@pytest.fixture
def write(tmp_path):
    def write(table: list[dict] | pd.DataFrame, name: str):
        path = tmp_path / f"{name}.parquet"
        pd.DataFrame(table).to_parquet(path)
        return path

    return write


@pytest.fixture
def cfg(encoders_config):
    return encoders_config(precision="fp32")


def _extract(path, cfg, cache, fx):
    res = extract_features(path, cfg, cache, progress=False, extractor=fx, chunk_rows=CHUNK)
    ids = pd.read_parquet(path)["id"].tolist()
    return res, {i: (img, txt) for i, img, txt in zip(ids, np.load(res.image_path), np.load(res.text_path))}


def _no_encoder(monkeypatch):
    def boom(name, device):
        raise AssertionError(f"encoder {name} was loaded although every item is in the store")

    monkeypatch.setattr(embed, "load_image_encoder", boom)
    monkeypatch.setattr(embed, "load_text_encoder", boom)


def test_grown_table_encodes_only_the_new_items(rows, write, cfg, tmp_path, counting_extractor):
    cache = tmp_path / "cache"
    first, before = _extract(write(rows[:BASE], "first"), cfg, cache, counting_extractor(cfg))
    assert first.encoded == {"image": BASE - 1, "text": BASE - 1} and first.reused == {"image": 0, "text": 0}
    assert first.computed == {"image": True, "text": True}

    # 10 new rows and one that pairs an old image with a new text, the whole table shuffled.
    extra = [*rows[BASE : BASE + 10], {**rows[5], "id": "old-image", "text": "a caption nobody wrote before"}]
    grown = pd.DataFrame(rows[:BASE] + extra).sample(frac=1, random_state=0)
    fx = counting_extractor(cfg)
    second, after = _extract(write(grown, "grown"), cfg, cache, fx)
    assert second.encoded == {"image": 10, "text": 11} and second.reused == {"image": BASE - 1, "text": BASE - 1}
    assert sorted(fx.images) == sorted(r["image"] for r in rows[BASE : BASE + 10])
    assert len(fx.texts) == 11
    assert second.computed == {"image": True, "text": True} and second.image_key != first.image_key
    for i, (img, txt) in before.items():  # read back from the store, not encoded again (another stamp)
        np.testing.assert_array_equal(after[i][0], img)
        np.testing.assert_array_equal(after[i][1], txt)
    np.testing.assert_array_equal(after["old-image"][0], before["r5"][0])
    assert np.isfinite(np.stack([after[r["id"]][0] for r in extra])).all()
    assert not np.array_equal(after["old-image"][1], before["r5"][1])
    meta = json.loads(second.image_path.with_suffix(".json").read_text())
    assert (meta["distinct"], meta["encoded"]) == (BASE + 9, 10)
    assert json.dumps(second.to_dict()) and second.to_dict()["encoded"] == second.encoded


def test_reordered_or_shrunk_table_encodes_nothing(rows, write, cfg, tmp_path, counting_extractor, monkeypatch):
    cache = tmp_path / "cache"
    _, before = _extract(write(rows[:BASE], "first"), cfg, cache, counting_extractor(cfg))
    _no_encoder(monkeypatch)  # and no extractor lent: one would have to be built to encode anything
    for name, table in (("reversed", rows[:BASE][::-1]), ("shrunk", rows[20:BASE])):
        path = write(table, name)
        res = extract_features(path, cfg, cache, progress=False, chunk_rows=CHUNK)
        n_images = len({r["image_sha256"] for r in table})
        assert res.encoded == {"image": 0, "text": 0}
        assert res.reused == {"image": n_images, "text": len({r["text"] for r in table})}
        assert res.computed == {"image": True, "text": True}  # a new assembled array, from the store alone
        for i, img, txt in zip(pd.read_parquet(path)["id"], np.load(res.image_path), np.load(res.text_path)):
            np.testing.assert_array_equal(img, before[i][0])
            np.testing.assert_array_equal(txt, before[i][1])
        again = extract_features(path, cfg, cache, progress=False, chunk_rows=CHUNK)
        assert again.computed == {"image": False, "text": False}  # the assembled array, whole
        assert again.encoded == {"image": 0, "text": 0} and again.reused == res.reused


def test_crashed_run_resumes_from_its_chunks(rows, write, cfg, tmp_path, counting_extractor, tmp_files):
    cache, path = tmp_path / "cache", write(rows[:BASE], "first")
    # 3 items a batch, 4 a chunk: after 5 batches (15 images) 3 chunks (12 images) are on disk.
    with pytest.raises(RuntimeError, match="crashed"):
        extract_features(path, cfg, cache, progress=False, extractor=counting_extractor(cfg, fail_after=5),
                         chunk_rows=CHUNK)
    shelf = shelf_dirs(cache, cfg, "fp32")["image"]
    assert len(list(shelf.glob("*.keys"))) == 3 and not list((cache / "image").glob("*.npy"))
    fx = counting_extractor(cfg)
    res = extract_features(path, cfg, cache, progress=False, extractor=fx, chunk_rows=CHUNK)
    assert res.encoded == {"image": BASE - 1 - 12, "text": BASE - 1} and res.reused == {"image": 12, "text": 0}
    assert sorted(fx.images) == sorted(r["image"] for r in rows[12 : BASE - 1])
    assert np.isfinite(np.load(res.image_path)).all() and not tmp_files(cache)


def test_chunks_are_named_by_their_items(rows, write, cfg, tmp_path, counting_extractor):
    """Two runs that encode the same items write the same chunk names (so concurrent writers agree), each name
    the sha256 of its keys file, the keys the sha256 of each image's bytes."""
    path = write(rows[:BASE], "first")
    names = []
    for cache in (tmp_path / "a", tmp_path / "b"):
        extract_features(path, cfg, cache, progress=False, extractor=counting_extractor(cfg), chunk_rows=CHUNK)
        shelf = shelf_dirs(cache, cfg, "fp32")["image"]
        names.append(sorted(p.name for p in shelf.iterdir()))
        for keys in shelf.glob("*.keys"):
            assert hashlib.sha256(keys.read_bytes()).hexdigest() == keys.stem
            assert np.load(keys.with_suffix(".npy")).shape == (len(keys.read_bytes()) // 32, 6)
    assert names[0] == names[1] and len(names[0]) == 2 * 8 + 1  # 29 images in 8 chunks, and shelf.json
    first_chunk = [bytes.fromhex(r["image_sha256"]) for r in rows[:CHUNK]]
    assert (shelf / f"{hashlib.sha256(b''.join(first_chunk)).hexdigest()}.keys").read_bytes() == b"".join(first_chunk)


def test_settings_have_their_own_shelf(rows, write, cfg, tmp_path, counting_extractor, encoders_config):
    cache, path = tmp_path / "cache", write(rows[:BASE], "first")
    extract_features(path, cfg, cache, progress=False, extractor=counting_extractor(cfg), chunk_rows=CHUNK)
    bigger = encoders_config(precision="fp32", image={"image_size": 72})
    res = extract_features(path, bigger, cache, progress=False, extractor=counting_extractor(bigger))
    assert res.encoded == {"image": BASE - 1, "text": 0} and res.reused == {"image": 0, "text": BASE - 1}
    assert shelf_dirs(cache, bigger, "fp32")["image"] != shelf_dirs(cache, cfg, "fp32")["image"]
    assert shelf_dirs(cache, bigger, "fp32")["text"] == shelf_dirs(cache, cfg, "fp32")["text"]
    assert shelf_dirs(cache, cfg, "bf16")["text"] != shelf_dirs(cache, cfg, "fp32")["text"]


def test_absent_items_stay_nan_and_are_not_counted(rows, write, cfg, tmp_path, counting_extractor):
    cache = tmp_path / "cache"
    _, before = _extract(write(rows[:BASE], "first"), cfg, cache, counting_extractor(cfg))
    gappy = pd.DataFrame(rows[:BASE + 4])
    gappy.loc[[2, 31], ["image", "image_sha256"]] = None
    gappy.loc[[4, 32], "text"] = [None, "   "]
    fx = counting_extractor(cfg)
    res, after = _extract(write(gappy, "gappy"), cfg, cache, fx)
    assert res.encoded == {"image": 3, "text": 3} and res.reused == {"image": BASE - 2, "text": BASE - 2}
    assert None not in fx.images and sorted(fx.texts) == ["caption 30", "caption 31", "caption 33"]
    for i in ("r2", "r31"):
        assert np.isnan(after[i][0]).all() and np.isfinite(after[i][1]).all()
    for i in ("r4", "r32"):
        assert np.isnan(after[i][1]).all() and np.isfinite(after[i][0]).all()
    np.testing.assert_array_equal(after["r4"][0], before["r4"][0])


def test_chunks_replaced_while_assembling_are_read_anew(rows, write, cfg, tmp_path, counting_extractor, monkeypatch):
    """``--force`` may replace the chunks a run is reading: that run looks at the shelf again and reads the new ones."""
    path = write(rows[:BASE], "first")
    extract_features(path, cfg, tmp_path / "a", progress=False, extractor=counting_extractor(cfg), chunk_rows=CHUNK)
    # The same items encoded anew elsewhere, in other chunks (5 a chunk): moving them in supersedes every old chunk.
    extract_features(path, cfg, tmp_path / "b", progress=False, extractor=counting_extractor(cfg), chunk_rows=5)
    forced = dict(zip(pd.read_parquet(path)["id"], np.load(next((tmp_path / "b" / "image").glob("*.npy")))))
    src, dst = (shelf_dirs(tmp_path / c, cfg, "fp32")["image"] for c in ("b", "a"))
    real, moved = Shelf.rows, []

    def replaced_meanwhile(self, chunk):
        if self.root == dst and not moved:
            moved.append(replace_shelf(src, dst))
        return real(self, chunk)

    monkeypatch.setattr(Shelf, "rows", replaced_meanwhile)
    res, after = _extract(write(rows[:BASE][::-1], "reversed"), cfg, tmp_path / "a", counting_extractor(cfg))
    assert moved and res.encoded == {"image": 0, "text": 0}
    for i, (img, _) in after.items():
        np.testing.assert_array_equal(img, forced[i])


def test_arrays_of_the_earlier_layout_are_still_served(rows, write, cfg, tmp_path, counting_extractor, monkeypatch):
    """A whole-table array without a shelf (the earlier layout, same name and key) serves an unchanged table; the
    chunk folder of a run killed under that layout is removed."""
    cache, path = tmp_path / "cache", write(rows[:BASE], "first")
    first = extract_features(path, cfg, cache, progress=False, extractor=counting_extractor(cfg))
    for kind in ("image", "text"):
        shutil.rmtree(cache / kind / "items")
        (cache / kind / f"{getattr(first, f'{kind}_key')}.json").unlink()  # its description had no counts
    leftover = cache / "image" / f"{first.image_key}.parts"
    leftover.mkdir()
    (leftover / "000000.npy").write_bytes(b"a chunk of the earlier layout")
    _no_encoder(monkeypatch)
    res = extract_features(path, cfg, cache, progress=False)
    assert res.computed == {"image": False, "text": False}
    assert res.encoded == {"image": 0, "text": 0} and res.reused == {"image": BASE - 1, "text": BASE - 1}
    np.testing.assert_array_equal(np.load(res.image_path), np.load(first.image_path))
    assert not leftover.exists()
