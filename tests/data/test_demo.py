"""The embedded demo dataset: deterministic, fast, and its label needs both the image and the caption."""

from __future__ import annotations

import csv
import time

import numpy as np
import pytest
from PIL import Image

from crossmodal.config import DemoConfig
from crossmodal.data import demo
from crossmodal.data.demo import generate_demo


def _rows(manifest):
    with open(manifest, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _sentiment(text: str) -> str:
    t = text.lower()
    pos = any(w.lower() in t for w in demo.POS_ADJ + demo.POS_FEEL + demo.POS_CLAUSE)
    neg = any(w.lower() in t for w in demo.NEG_ADJ + demo.NEG_FEEL + demo.NEG_CLAUSE)
    assert not (pos and neg), text
    return "positive" if pos else "negative" if neg else "neutral"


def _mood(path) -> str:
    a = np.asarray(Image.open(path).convert("RGB"), dtype=float)
    warm = ((a[..., 0] + a[..., 1]) / 2 - a[..., 2]).mean() + 0.5 * a.mean()  # yellow and bright vs grey-blue
    return "sunny" if warm > 75 else "gloomy"


@pytest.fixture(scope="module")
def clean_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    t0 = time.perf_counter()
    manifest = generate_demo(out, DemoConfig(rows=120, seed=11, image_size=48, label_noise=0.0, bad_rows=False))
    return manifest, time.perf_counter() - t0


def test_same_seed_same_bytes(tmp_path):
    cfg = DemoConfig(rows=60, seed=5, image_size=40)
    a, b = generate_demo(tmp_path / "a", cfg), generate_demo(tmp_path / "b", cfg)
    assert a.read_bytes() == b.read_bytes()
    for name in ("m00000.jpg", "m00059.jpg", "bad_truncated.jpg"):
        assert (tmp_path / "a" / "images" / name).read_bytes() == (tmp_path / "b" / "images" / name).read_bytes()
    c = generate_demo(tmp_path / "c", DemoConfig(rows=60, seed=6, image_size=40))
    assert c.read_bytes() != a.read_bytes()


def test_columns_ids_groups_and_images(clean_demo):
    manifest, seconds = clean_demo
    rows = _rows(manifest)
    assert list(rows[0]) == ["id", "image", "text", "label", "group"]  # no split column: the pipeline splits
    assert len(rows) == 120 and len({r["id"] for r in rows}) == 120
    assert {r["label"] for r in rows} == set(demo.LABELS)
    assert 3 <= len(rows) / len({r["group"] for r in rows}) <= 8  # about 5 rows per poster
    img = Image.open(manifest.parent / rows[0]["image"])
    assert img.format == "JPEG" and img.size == (48, 48)
    assert seconds < 10


def test_label_needs_both_modalities(clean_demo):
    manifest, _ = clean_demo
    seen = set()
    for r in _rows(manifest):
        sentiment, mood = _sentiment(r["text"]), _mood(manifest.parent / r["image"])
        if sentiment == "neutral":
            expected = "neutral"
        else:
            expected = "sincere" if (sentiment == "positive") == (mood == "sunny") else "sarcastic"
        assert r["label"] == expected, (r, sentiment, mood)
        seen.add((sentiment, mood))
    # every combination occurs, so neither the caption nor the image alone decides the label
    assert seen == {(s, m) for s in ("positive", "negative", "neutral") for m in ("sunny", "gloomy")}


def test_label_noise_flips_some_labels(tmp_path):
    clean = _rows(generate_demo(tmp_path / "a", DemoConfig(rows=300, seed=2, image_size=32, label_noise=0.0,
                                                           bad_rows=False)))
    noisy = _rows(generate_demo(tmp_path / "b", DemoConfig(rows=300, seed=2, image_size=32, label_noise=0.2,
                                                           bad_rows=False)))
    flipped = sum(a["label"] != b["label"] for a, b in zip(clean, noisy))
    assert [a["text"] for a in clean] == [b["text"] for b in noisy]
    assert 30 <= flipped <= 90


def test_bad_rows_are_appended(tmp_path):
    manifest = generate_demo(tmp_path, DemoConfig(rows=60, seed=1, image_size=32))
    rows = _rows(manifest)
    bad = [r for r in rows if r["id"].startswith("bad-")]
    assert len(rows) == 66 and len(bad) == 6
    images = tmp_path / "images"
    assert not (images / "bad_missing.jpg").exists()
    assert (images / "bad_empty.jpg").stat().st_size == 0
    assert (images / "bad_text.jpg").read_bytes().startswith(b"This is a text file")
    assert {r["id"] for r in bad if not r["label"]} == {"bad-missing-label"}
    assert {r["id"] for r in bad if not r["text"].strip()} == {"bad-empty-caption"}
