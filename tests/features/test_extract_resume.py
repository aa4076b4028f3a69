"""The chunked feature store under failure: a run killed mid-extraction resumes, a full disk is a clear error.

A tiny convolutional image encoder (registered like any other) stands in for EfficientNet so that the killed
run is a real subprocess that starts in seconds; text features come from the real MiniLM.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from crossmodal.encoders.image import ImageEncoder
from crossmodal.encoders.registry import IMAGE_ENCODERS
from crossmodal.errors import FeatureError
from crossmodal.features import extract, shelf
from crossmodal.features.extract import extract_features, shelf_dirs
from crossmodal.features.extractor import FeatureExtractor

ROWS, CHUNK = 24, 4
TINY_SETTINGS = {"image": {"name": "tiny_test", "image_size": 32, "batch_size": 2},
                 "text": {"max_length": 16, "batch_size": 8}, "precision": "fp32", "num_workers": 0}


@pytest.fixture(scope="module")
def cfg(encoders_config):
    """The tiny image encoder on 32 px images, MiniLM on 16 tokens, fp32, decoding in this process."""
    return encoders_config(**TINY_SETTINGS)


@pytest.fixture(scope="module")
def table(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    rows = []
    for i in range(ROWS):
        path = root / f"img{i}.png"
        Image.new("RGB", (40, 36), (10 * i, 255 - 9 * i, (70 * i) % 256)).save(path)
        rows.append({"id": f"r{i}", "image": str(path), "text": f"caption number {i}", "label": "a",
                     "split": "train", "image_sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    pd.DataFrame(rows).to_parquet(root / "validated.parquet")
    return root / "validated.parquet"


@pytest.fixture
def reference(table, tmp_path_factory, fx, cfg):
    """Features of an uninterrupted run."""
    res = extract_features(table, cfg, tmp_path_factory.mktemp("ref"), progress=False, extractor=fx,
                           chunk_rows=CHUNK)
    return np.load(res.image_path), np.load(res.text_path)


def _chunks(cache: Path) -> list[Path]:
    """The image chunks on disk that are whole: a chunk counts once its keys file is written, after its features."""
    return sorted(p.with_suffix(".npy") for p in (cache / "image" / "items").glob("*/*.keys"))


def test_killed_run_resumes_from_finished_chunks(table, tmp_path, fx, reference, cfg, tmp_files, tiny_encoder):
    cache = tmp_path / "cache"
    script = tmp_path / "run.py"
    script.write_text(tiny_encoder.source + textwrap.dedent(f"""
        import functools, json, sys
        from crossmodal.config import EncodersConfig
        from crossmodal.encoders.registry import IMAGE_ENCODERS
        from crossmodal.features.extract import extract_features
        IMAGE_ENCODERS["tiny_test"] = functools.partial(tiny_encoder, delay=0.4)
        cfg = EncodersConfig.model_validate(json.loads(sys.argv[1]))
        extract_features({str(table)!r}, cfg, {str(cache)!r}, progress=False, chunk_rows={CHUNK})
        print("finished")
    """))
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(cfg.model_dump())],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while len(_chunks(cache)) < 2:  # wait until it is well into the images, then kill it without warning
            assert proc.poll() is None, f"extraction ended early: {proc.communicate()}"
            assert time.monotonic() < deadline, "no chunk written within 180 s"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    done = _chunks(cache)
    assert 2 <= len(done) < ROWS // CHUNK
    assert not list((cache / "image").glob("*.npy")), "a killed run must not leave a final feature file"
    for chunk in done:  # every chunk on disk is whole (written atomically)
        assert np.load(chunk).shape == (CHUNK, 8)

    seen = fx.image_encoder.module.seen
    result = extract_features(table, cfg, cache, progress=False, extractor=fx, chunk_rows=CHUNK)
    assert result.computed == {"image": True, "text": True}
    # Only the images of the missing chunks went through the encoder again.
    assert fx.image_encoder.module.seen - seen == ROWS - CHUNK * len(done)
    assert result.encoded["image"] == ROWS - CHUNK * len(done) and result.reused["image"] == CHUNK * len(done)
    np.testing.assert_allclose(np.load(result.image_path), reference[0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.load(result.text_path), reference[1])
    assert not tmp_files(cache) and set(_chunks(cache)) >= set(done)  # the chunks stay: they are the store

    seen = fx.image_encoder.module.seen
    again = extract_features(table, cfg, cache, progress=False, extractor=fx, chunk_rows=CHUNK)
    assert again.computed == {"image": False, "text": False} and fx.image_encoder.module.seen == seen
    assert again.encoded == {"image": 0, "text": 0} and again.reused == {"image": ROWS, "text": ROWS}


def test_full_disk_is_a_clear_error_and_the_cache_stays_consistent(table, tmp_path, fx, reference, monkeypatch, cfg,
                                                                     tmp_files):
    cache = tmp_path / "cache"
    real, calls = shelf.write_chunk, []

    def disk_fills_up(path, arr):
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        calls.append(path)
        real(path, arr)

    monkeypatch.setattr(shelf, "write_chunk", disk_fills_up)
    with pytest.raises(FeatureError) as info:
        extract_features(table, cfg, cache, progress=False, extractor=fx, chunk_rows=CHUNK)
    message = str(info.value)
    assert "no space left" in message and str(cache) in message and "paths.cache" in message
    assert len(_chunks(cache)) == 3 and not tmp_files(cache)
    assert not list((cache / "image").glob("*.npy"))

    monkeypatch.setattr(shelf, "write_chunk", real)
    seen = fx.image_encoder.module.seen
    result = extract_features(table, cfg, cache, progress=False, extractor=fx, chunk_rows=CHUNK)
    assert fx.image_encoder.module.seen - seen == ROWS - 3 * CHUNK
    np.testing.assert_allclose(np.load(result.image_path), reference[0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.load(result.text_path), reference[1])


def test_full_disk_while_assembling(table, tmp_path, fx, reference, monkeypatch, cfg, tiny_encoder):
    cache = tmp_path / "cache"

    def no_space(path):  # the disk fills up when the chunks are assembled into the table's array
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(extract, "atomic_path", no_space)  # the shelf writes its chunks with its own
    with pytest.raises(FeatureError, match="no space left"):
        extract_features(table, cfg, cache, progress=False, extractor=fx, chunk_rows=CHUNK)
    assert len(_chunks(cache)) == ROWS // CHUNK  # every chunk kept: the rerun only assembles
    monkeypatch.undo()
    monkeypatch.setitem(IMAGE_ENCODERS, "tiny_test", tiny_encoder.load)
    seen = fx.image_encoder.module.seen
    result = extract_features(table, cfg, cache, progress=False, extractor=fx, chunk_rows=CHUNK)
    assert fx.image_encoder.module.seen == seen
    np.testing.assert_allclose(np.load(result.image_path), reference[0], rtol=0, atol=1e-5)


def test_stale_temporary_files_and_damaged_chunks(table, tmp_path, fx, reference, cfg, tmp_files):
    cache = tmp_path / "cache"
    extract_features(table, cfg, cache, progress=False, extractor=fx, chunk_rows=CHUNK)
    folder = shelf_dirs(cache, cfg, "fp32")["image"]
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    stale = [where / f".x.npy.{int(dead.stdout)}.0123456789ab.tmp" for where in (folder, cache / "image")]
    for p in stale:
        p.write_bytes(b"half a chunk")
    damaged, truncated = _chunks(cache)[:2]
    damaged.write_bytes(b"not an npy file")  # a damaged chunk is encoded again, not trusted
    with open(truncated, "r+b") as fh:
        fh.truncate(200)
    for p in (cache / "image").glob("*.npy"):
        p.unlink()  # the assembled array: this run reads the shelf
    seen = fx.image_encoder.module.seen
    result = extract_features(table, cfg, cache, progress=False, extractor=fx, chunk_rows=CHUNK)
    assert not any(p.exists() for p in stale) and not tmp_files(cache)
    assert fx.image_encoder.module.seen - seen == 2 * CHUNK and result.encoded["image"] == 2 * CHUNK
    np.testing.assert_allclose(np.load(result.image_path), reference[0], rtol=0, atol=1e-5)
    assert np.load(damaged).shape == np.load(truncated).shape == (CHUNK, 8)  # written again, whole, same names


def test_chunk_size_does_not_change_the_features(table, tmp_path, fx, reference, cfg):
    for chunk_rows in (1, 5, 1000):
        res = extract_features(table, cfg, tmp_path / f"c{chunk_rows}", progress=False, extractor=fx,
                               chunk_rows=chunk_rows)
        np.testing.assert_allclose(np.load(res.image_path), reference[0], rtol=0, atol=1e-5)
        # other chunks, other text batches (other padding): equal up to float rounding
        np.testing.assert_allclose(np.load(res.text_path), reference[1], rtol=0, atol=1e-6)


def test_missing_modality_gives_nan_rows_and_is_not_encoded(table, tmp_path, fx, reference, cfg):
    df = pd.read_parquet(table)
    df.loc[[1, 5], ["image", "image_sha256"]] = None
    df.loc[7, "image"], df.loc[7, "image_sha256"] = "", ""
    df.loc[[2, 3], "text"] = [None, "  "]
    df.to_parquet(tmp_path / "validated.parquet")
    seen = fx.image_encoder.module.seen
    res = extract_features(tmp_path / "validated.parquet", cfg, tmp_path / "cache", progress=False,
                           extractor=fx, chunk_rows=CHUNK)
    img, txt = np.load(res.image_path), np.load(res.text_path)
    assert img.shape == (ROWS, 8) and txt.shape == (ROWS, 384)
    absent_img, absent_txt = np.isin(np.arange(ROWS), [1, 5, 7]), np.isin(np.arange(ROWS), [2, 3])
    assert np.isnan(img[absent_img]).all() and np.isfinite(img[~absent_img]).all()
    assert np.isnan(txt[absent_txt]).all() and np.isfinite(txt[~absent_txt]).all()
    assert fx.image_encoder.module.seen - seen == ROWS - 3  # absent images never reach the encoder
    assert res.encoded == {"image": ROWS - 3, "text": ROWS - 2} and res.reused == {"image": 0, "text": 0}
    np.testing.assert_allclose(img[~absent_img], reference[0][~absent_img], rtol=0, atol=1e-5)
    np.testing.assert_allclose(txt[~absent_txt], reference[1][~absent_txt], rtol=0, atol=1e-6)
    full = extract.feature_keys(pd.read_parquet(table), cfg, "fp32")
    assert (res.image_key, res.text_key) != (full["image"], full["text"])

    # A modality absent from every row: all NaN, still the encoder's width.
    df["text"] = None
    df.to_parquet(tmp_path / "no_text.parquet")
    res = extract_features(tmp_path / "no_text.parquet", cfg, tmp_path / "cache", progress=False, extractor=fx)
    txt = np.load(res.text_path)
    assert txt.shape == (ROWS, 384) and np.isnan(txt).all()


def test_grown_table_encodes_only_its_new_rows(table, tmp_path, fx, reference, cfg):
    """With the real image path (decoding, resizing, the tiny encoder) and MiniLM: the first rows' features come back
    bit for bit from the store, and only the new rows go through the encoders."""
    df = pd.read_parquet(table)
    first = tmp_path / "first.parquet"
    df.iloc[:16].to_parquet(first)
    cache = tmp_path / "cache"
    one = extract_features(first, cfg, cache, progress=False, extractor=fx, chunk_rows=CHUNK)
    before = np.load(one.image_path), np.load(one.text_path)
    seen = fx.image_encoder.module.seen
    order = np.random.default_rng(0).permutation(ROWS)
    df.iloc[order].to_parquet(tmp_path / "grown.parquet")
    res = extract_features(tmp_path / "grown.parquet", cfg, cache, progress=False, extractor=fx, chunk_rows=CHUNK)
    assert fx.image_encoder.module.seen - seen == ROWS - 16
    assert res.encoded == {"image": ROWS - 16, "text": ROWS - 16} and res.reused == {"image": 16, "text": 16}
    img, txt = np.load(res.image_path), np.load(res.text_path)
    old = order < 16
    np.testing.assert_array_equal(img[old], before[0][order[old]])
    np.testing.assert_array_equal(txt[old], before[1][order[old]])
    np.testing.assert_allclose(img, reference[0][order], rtol=0, atol=1e-5)
    np.testing.assert_allclose(txt, reference[1][order], rtol=0, atol=1e-6)


def test_image_without_hash_is_still_refused(table, tmp_path, cfg):
    df = pd.read_parquet(table)
    df.loc[4, "image_sha256"] = None
    df.to_parquet(tmp_path / "v.parquet")
    with pytest.raises(FeatureError, match=r"image_sha256.*'r4'"):
        extract_features(tmp_path / "v.parquet", cfg, tmp_path / "cache")


def test_out_of_memory_halves_the_batch(table, fx, cfg):
    paths = pd.read_parquet(table)["image"].tolist()[:10]
    cfg = cfg.model_copy(update={"image": cfg.image.model_copy(update={"batch_size": 8})})
    normal = FeatureExtractor(cfg, image_encoder=fx.image_encoder).embed_images(paths)
    module = fx.image_encoder.module
    oom = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError

    class Small(torch.nn.Module):  # a device with room for 3 images at a time
        def forward(self, x):
            if len(x) > 3:
                raise oom("CUDA out of memory. Tried to allocate 2.00 GiB")
            return module(x)

    small = FeatureExtractor(cfg, image_encoder=ImageEncoder("tiny_test", Small(), 8, (0.5,) * 3, (0.25,) * 3,
                                                             channels_last=False))
    assert small.image_batch_size == 8
    np.testing.assert_allclose(small.embed_images(paths), normal, rtol=0, atol=1e-5)
    assert small.image_batch_size == 2

    class Broken(torch.nn.Module):  # any other error is not an out-of-memory and is not retried
        def forward(self, x):
            raise RuntimeError("shape mismatch")

    broken = FeatureExtractor(cfg, image_encoder=ImageEncoder("tiny_test", Broken(), 8, (0.5,) * 3, (0.25,) * 3))
    with pytest.raises(RuntimeError, match="shape mismatch"):
        broken.embed_images(paths)
    assert broken.image_batch_size == 8
