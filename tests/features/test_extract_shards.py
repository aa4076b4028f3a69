"""Sharded extraction: ranges of distinct items that independent processes encode into one shared store.

The tiny convolutional image encoder stands in for EfficientNet (so the concurrent writers are real processes that
start in seconds); text features come from the real MiniLM, whose features depend slightly on the texts that share
a batch, so shards of other sizes than the store's chunks agree with one call to float rounding only.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from crossmodal.encoders.registry import IMAGE_ENCODERS
from crossmodal.errors import ConfigError, FeatureError
from crossmodal.features import extract
from crossmodal.features import extractor as embed
from crossmodal.features.extract import encode_shard, extract_features, plan_shards, shared_extractor, shelf_dirs
from crossmodal.features.extractor import FeatureExtractor
from crossmodal.features.shelf import FOREIGN_TMP_SECONDS, Shelf
from crossmodal.files import HOST

ROWS, CHUNK = 20, 2
# Row 19 repeats row 0's image, row 7 row 3's text, row 5 has no text: 19 distinct images, 18 distinct texts.
DISTINCT = {"image": 19, "text": 18}
SETTINGS = {"image": {"name": "tiny_test", "image_size": 32, "batch_size": 2},
            "text": {"max_length": 16, "batch_size": 8}, "precision": "fp32", "num_workers": 0}
ATOL = {"image": 1e-5, "text": 1e-6}  # what the feature store's tests accept across other batches


@pytest.fixture(scope="module")
def cfg(encoders_config):
    return encoders_config(**SETTINGS)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    rows = []
    for i in range(ROWS):
        path = root / f"img{0 if i == 19 else i}.png"
        if not path.exists():
            Image.new("RGB", (40, 36), (12 * i, 255 - 11 * i, (70 * i) % 256)).save(path)
        text = None if i == 5 else f"caption number {3 if i == 7 else i}" + " and more" * (i % 4)
        rows.append({"id": f"r{i}", "image": str(path), "text": text, "label": "ab"[i % 2], "split": "train",
                     "image_sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    pd.DataFrame(rows).to_parquet(root / "validated.parquet")
    return root / "validated.parquet"


@pytest.fixture(scope="module")
def reference(table, tmp_path_factory, text_encoder, tiny_encoder, cfg):
    """The arrays of one unsharded call on a fresh store."""
    fx = FeatureExtractor(cfg, image_encoder=tiny_encoder.load("tiny_test", "cpu"), text_encoder=text_encoder)
    res = extract_features(table, cfg, tmp_path_factory.mktemp("ref"), progress=False, extractor=fx,
                           chunk_rows=CHUNK)
    return {"image": np.load(res.image_path), "text": np.load(res.text_path)}


def _no_encoder(monkeypatch):
    def boom(name, device):
        raise AssertionError(f"encoder {name} was loaded although every item is in the store")

    monkeypatch.setattr(embed, "load_image_encoder", boom)
    monkeypatch.setattr(embed, "load_text_encoder", boom)


def _assemble_from_store(table, cfg, cache, monkeypatch) -> dict[str, np.ndarray]:
    """extract_features after the shards: it must find every item and encode nothing."""
    _no_encoder(monkeypatch)
    res = extract_features(table, cfg, cache, progress=False, chunk_rows=CHUNK)
    assert res.encoded == {"image": 0, "text": 0} and res.reused == DISTINCT
    assert res.computed == {"image": True, "text": True}
    return {"image": np.load(res.image_path), "text": np.load(res.text_path)}


def _assert_close(got: dict, want: dict) -> None:
    for kind in ("image", "text"):
        np.testing.assert_allclose(got[kind], want[kind], rtol=0, atol=ATOL[kind])


def test_plan_covers_every_distinct_item_once(table, cfg, fx, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    with monkeypatch.context() as m:
        m.setattr(extract, "FeatureExtractor", None)  # planning builds no extractor
        shards = plan_shards(table, cfg, cache, 5)
    assert json.loads(json.dumps(shards)) == shards
    for kind, n in DISTINCT.items():
        mine = [s for s in shards if s["kind"] == kind]
        assert [(s["start"], s["stop"]) for s in mine] == [(a, min(a + 5, n)) for a in range(0, n, 5)]
        assert all(s["items"] == s["missing"] == s["stop"] - s["start"] for s in mine)

    # A range the shelf holds whole is left out; a partly held one says how much is missing.
    middle = next(s for s in shards if s["kind"] == "image" and s["start"] == 5)
    encode_shard(table, cfg, cache, "image", 5, 10, extractor=fx, chunk_rows=CHUNK)
    encode_shard(table, cfg, cache, "text", 0, 3, extractor=fx, chunk_rows=CHUNK)
    again = plan_shards(table, cfg, cache, 5)
    assert middle not in again and len(again) == len(shards) - 1
    assert next(s for s in again if s["kind"] == "text" and s["start"] == 0)["missing"] == 2

    extract_features(table, cfg, cache, progress=False, extractor=fx, chunk_rows=CHUNK)
    assert plan_shards(table, cfg, cache, 5) == []


@pytest.mark.parametrize("shard_items", [2 * CHUNK, 3])
def test_shards_then_extract_gives_the_features_of_one_call(table, cfg, fx, reference, tmp_path, monkeypatch,
                                                            shard_items):
    cache = tmp_path / "cache"
    done = [encode_shard(table, cfg, cache, s["kind"], s["start"], s["stop"], extractor=fx, chunk_rows=CHUNK)
            for s in plan_shards(table, cfg, cache, shard_items)]
    assert {kind: sum(d["encoded"] for d in done if d["kind"] == kind) for kind in DISTINCT} == DISTINCT
    assert all(set(d) == {"kind", "start", "stop", "encoded", "seconds"} for d in done)
    got = _assemble_from_store(table, cfg, cache, monkeypatch)
    if shard_items % CHUNK == 0:  # the shards' chunks are those of one call: the same batches, the same bits
        for kind in DISTINCT:
            np.testing.assert_array_equal(got[kind], reference[kind])
    else:
        _assert_close(got, reference)


def test_a_retried_shard_encodes_nothing(table, cfg, tmp_path, counting_extractor):
    cache = tmp_path / "cache"
    first = encode_shard(table, cfg, cache, "text", 4, 12, extractor=counting_extractor(cfg), chunk_rows=CHUNK)
    assert first["encoded"] == 8
    fx, heard = counting_extractor(cfg), []
    again = encode_shard(table, cfg, cache, "text", 4, 12, extractor=fx, chunk_rows=CHUNK,
                         on_progress=lambda *a: heard.append(a))
    assert again["encoded"] == 0 and fx.texts == [] and heard == [("text", 8, 8)]


class Killed(Exception):
    """The worker running a shard dies."""


@pytest.mark.parametrize("kind", ["image", "text"])
def test_a_killed_shard_resumes(table, cfg, fx, reference, tmp_path, monkeypatch, kind):
    cache, heard = tmp_path / "cache", []

    def killed(kind, done, total):
        heard.append((kind, done, total))
        if len(heard) == 2:  # after the first batch, whose chunk is then on disk
            raise Killed

    with pytest.raises(Killed):
        encode_shard(table, cfg, cache, kind, 0, 8, extractor=fx, chunk_rows=CHUNK, on_progress=killed)
    assert heard[0] == (kind, 0, 8)
    heard.clear()
    res = encode_shard(table, cfg, cache, kind, 0, 8, extractor=fx, chunk_rows=CHUNK,
                       on_progress=lambda *a: heard.append(a))
    assert heard[0] == (kind, CHUNK, 8) and heard[-1] == (kind, 8, 8) and res["encoded"] == 8 - CHUNK
    for s in plan_shards(table, cfg, cache, 8):
        encode_shard(table, cfg, cache, s["kind"], s["start"], s["stop"], extractor=fx, chunk_rows=CHUNK)
    _assert_close(_assemble_from_store(table, cfg, cache, monkeypatch), reference)


def test_two_processes_fill_one_shelf_at_once(table, cfg, fx, reference, tmp_path, tiny_encoder, monkeypatch,
                                              tmp_files):
    """Both start together on the same shard (a retried task while the first still runs), then take the others
    from opposite ends, so they also meet on a range: the shelf stays whole and complete. Images only (the shelf
    is the same for texts), so that the workers start in seconds."""
    cache, go = tmp_path / "cache", tmp_path / "go"
    shards = [s for s in plan_shards(table, cfg, cache, 4) if s["kind"] == "image"]
    orders = [shards, [shards[0], *shards[:0:-1]]]
    script = tmp_path / "worker.py"
    script.write_text(tiny_encoder.source + textwrap.dedent(f"""
        import functools, json, os, sys, time
        from crossmodal.config import EncodersConfig
        from crossmodal.encoders.registry import IMAGE_ENCODERS
        from crossmodal.features.extract import encode_shard, plan_shards, shared_extractor
        IMAGE_ENCODERS["tiny_test"] = functools.partial(tiny_encoder, delay=0.05)
        cfg = EncodersConfig.model_validate(json.loads(sys.argv[1]))
        # Warm up (table reader, encoder, first forward) before the start, so that both really write at once.
        plan_shards({str(table)!r}, cfg, sys.argv[3] + ".cache", 4)
        shared_extractor(cfg).embed_images([{str(table.parent / "img0.png")!r}])
        open(sys.argv[3], "w").close()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        done = [encode_shard({str(table)!r}, cfg, {str(cache)!r}, s["kind"], s["start"], s["stop"], chunk_rows=2)
                for s in json.loads(sys.argv[2])]
        print(json.dumps(done))
    """))
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(script), json.dumps(cfg.model_dump()), json.dumps(order),
                               str(flag)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for order, flag in zip(orders, ready, strict=True)]
    try:
        deadline = time.monotonic() + 120
        while not all(f.exists() for f in ready):
            assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            assert time.monotonic() < deadline, "the workers did not load their encoders within 120 s"
            time.sleep(0.05)
        go.touch()
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs
    done = [d for out, _ in outs for d in json.loads(out.strip().splitlines()[-1])]
    assert DISTINCT["image"] <= sum(d["encoded"] for d in done) <= 2 * DISTINCT["image"]
    assert [s for s in plan_shards(table, cfg, cache, 4) if s["kind"] == "image"] == []

    assert not tmp_files(cache)
    for folder in shelf_dirs(cache, cfg, "fp32").values():
        names = {p.stem for p in folder.glob("*.keys")}
        assert names == {p.stem for p in folder.glob("*.npy")}  # every chunk whole: features and keys
        assert len(Shelf.open(folder).names) == len(names)  # and readable
    for s in plan_shards(table, cfg, cache, 4):
        encode_shard(table, cfg, cache, s["kind"], s["start"], s["stop"], extractor=fx, chunk_rows=CHUNK)
    _assert_close(_assemble_from_store(table, cfg, cache, monkeypatch), reference)


def test_a_worker_loads_the_encoders_once(table, cfg, tmp_path, tiny_encoder, text_encoder, monkeypatch,
                                          encoders_config):
    loads = []

    def load(name, device):
        loads.append(name)
        return tiny_encoder.load(name, device)

    monkeypatch.setitem(IMAGE_ENCODERS, "tiny_test", load)
    monkeypatch.setattr(embed, "load_text_encoder", lambda name, device: text_encoder)
    other = encoders_config(**{**SETTINGS, "image": {**SETTINGS["image"], "image_size": 48}})
    shared_extractor(other)  # another setting first: it is dropped, not kept beside this one
    for start in (0, 6, 12):
        encode_shard(table, cfg, tmp_path / "cache", "image", start, start + 6)
    assert loads == ["tiny_test"]
    fx = shared_extractor(cfg)
    assert shared_extractor(cfg.model_copy(deep=True)) is fx  # equal settings, the same extractor
    assert shared_extractor(other) is not fx and shared_extractor(cfg) is not fx  # one entry at a time


def test_bad_shards_are_refused(table, cfg, tmp_path):
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ConfigError, match="shard_items"):
            plan_shards(table, cfg, tmp_path, bad)
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError, match="kind"):
        encode_shard(table, cfg, tmp_path, "audio", 0, 4)
    with pytest.raises(ValueError, match="range"):
        encode_shard(table, cfg, tmp_path, "image", 4, 4)
    with pytest.raises(FeatureError, match="plan them again"):  # the table shrank since planning
        encode_shard(table, cfg, tmp_path, "image", 16, 24)


def test_another_hosts_temporary_files_outlive_the_sweep(tmp_path):
    """A shelf on a shared folder: a pid from another host says nothing about its writer, which may still run."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(dead.stdout)
    mine = tmp_path / f".a.npy.@{HOST}.{pid}.0123456789ab.tmp"
    untagged = tmp_path / f".b.npy.{pid}.0123456789ab.tmp"
    fresh, old = (tmp_path / f".{n}.npy.@{HOST}x.{pid}.0123456789ab.tmp" for n in "cd")
    for p in (mine, untagged, fresh, old):
        p.write_bytes(b"half a chunk")
    stale = time.time() - FOREIGN_TMP_SECONDS - 60
    os.utime(old, (stale, stale))
    Shelf.open(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [fresh.name]
