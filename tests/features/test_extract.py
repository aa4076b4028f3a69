"""Feature extraction and the content-addressed feature store, on a 10-row table of 48 px images."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from crossmodal.config import EncodersConfig
from crossmodal.data.images import ImageError
from crossmodal.encoders import registry as encoders
from crossmodal.encoders.registry import IMAGE_ENCODERS
from crossmodal.errors import FeatureError
from crossmodal.features import extract
from crossmodal.features import extractor as embed
from crossmodal.features.extract import extract_features
from crossmodal.features.extractor import FeatureExtractor
from crossmodal.hardware import cpu_has_fast_bf16

TEXTS = [
    "a red bus on a city street",
    "two cats sleeping on a sofa",
    "a plate of pasta with tomato sauce and basil leaves, served on a wooden table next to a glass of wine",
    "snowy mountains",
    "a red bus on a city street",  # duplicate text: encoded once, same features
    "a child flying a kite at the beach on a windy afternoon",
    "sunset",
    "an old lighthouse on a rocky coast",
    "a bowl of fruit",
    "a dog catching a frisbee in the park",
]


def _fail_loading(monkeypatch, kind: str = "both"):
    def boom(name, device):
        raise AssertionError(f"encoder {name} was loaded although the cache should have served it")

    if kind in ("image", "both"):
        monkeypatch.setattr(embed, "load_image_encoder", boom)
    if kind in ("text", "both"):
        monkeypatch.setattr(embed, "load_text_encoder", boom)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """validated.parquet with 10 rows; rows 0 and 9 share the same image file content."""
    root = tmp_path_factory.mktemp("data")
    rows = []
    for i, text in enumerate(TEXTS):
        img = Image.new("RGB", (48, 48), (25 * i, 255 - 20 * i, (90 * i) % 256))
        ImageDraw.Draw(img).ellipse((4 + i, 6, 30 + 2 * i, 40), fill=(255 - 25 * i, 40, 20 * i))
        if i == 9:
            img = Image.open(root / "img0.png").copy()
        path = root / f"img{i}.png"
        img.save(path)
        rows.append({"id": f"r{i}", "image": str(path.resolve()), "text": text, "label": str(i % 2),
                     "split": "train", "group": None,
                     "image_sha256": hashlib.sha256(path.read_bytes()).hexdigest(), "_row": i})
    path = root / "validated.parquet"
    pd.DataFrame(rows).to_parquet(path)
    return path


@pytest.fixture(scope="module")
def fx(encoders_config):
    """One extractor (encoders loaded once) for the whole module; other extractors borrow its encoders."""
    return FeatureExtractor(encoders_config())


def _borrow(fx, cfg: EncodersConfig) -> FeatureExtractor:
    return FeatureExtractor(cfg, image_encoder=fx.image_encoder, text_encoder=fx.text_encoder)


def test_extract_shapes_order_and_cache_hit(table, fx, tmp_path, monkeypatch, encoders_config, tmp_files):
    cache, out = tmp_path / "cache", tmp_path / "out"
    df = pd.read_parquet(table)
    cfg = encoders_config()

    first = extract_features(table, cfg, cache, out, progress=False, extractor=_borrow(fx, cfg))
    assert first.computed == {"image": True, "text": True}
    # 10 rows, 9 distinct images and 9 distinct texts: each encoded once
    assert first.encoded == {"image": 9, "text": 9} and first.reused == {"image": 0, "text": 0}
    img, txt = np.load(first.image_path), np.load(first.text_path)
    assert img.shape == (10, 1280) and txt.shape == (10, 384)
    assert img.dtype == np.float32 and txt.dtype == np.float32
    # Rows follow validated.parquet: same vectors as embedding the rows one list in the same order.
    np.testing.assert_allclose(img, fx.embed_images(df["image"].tolist()), atol=2e-2, rtol=0)
    np.testing.assert_allclose(txt, fx.embed_texts(df["text"].tolist()), atol=2e-3, rtol=0)
    np.testing.assert_array_equal(img[0], img[9])  # same content -> same vector
    np.testing.assert_array_equal(txt[0], txt[4])
    assert not np.allclose(img[0], img[1]) and not np.allclose(txt[0], txt[1])
    # out_dir copies for DVC, with a description
    assert first.image_path == (out / "image.npy").resolve()
    meta = json.loads((out / "features.json").read_text())
    assert meta["shapes"] == {"image": [10, 1280], "text": [10, 384]}
    assert meta["image_key"] == first.image_key and meta["image_encoder"] == "efficientnet_lite0"
    assert not tmp_files(tmp_path)

    meta_bytes = (out / "features.json").read_bytes()
    _fail_loading(monkeypatch)  # a second call must not even load an encoder
    second = extract_features(table, cfg, cache, out, progress=False)
    assert second.computed == {"image": False, "text": False}
    assert second.encoded == {"image": 0, "text": 0} and second.reused == {"image": 9, "text": 9}
    assert (second.image_key, second.text_key) == (first.image_key, first.text_key)
    np.testing.assert_array_equal(np.load(second.image_path), img)
    np.testing.assert_array_equal(np.load(second.text_path), txt)
    assert (out / "features.json").read_bytes() == meta_bytes  # deterministic, for DVC
    # the cache layout: the assembled arrays cache/<kind>/<key>.npy, the items in cache/<kind>/items/<shelf key>/
    assert (cache / "image" / f"{first.image_key}.npy").is_file()
    assert (cache / "text" / f"{first.text_key}.npy").is_file()
    shelves = extract.shelf_dirs(cache, cfg, first.precision)
    assert shelves["image"].parent == cache / "image" / "items" and len(list(shelves["image"].glob("*.keys"))) == 1
    assert json.loads((shelves["text"] / "shelf.json").read_text())["dim"] == 384
    assert json.dumps(second.to_dict())  # JSON-able for Prefect and DVC


def test_image_params_change_only_the_image_key(table, fx, tmp_path, monkeypatch, encoders_config, tiny_encoder):
    cache = tmp_path / "cache"
    base = extract_features(table, encoders_config(), cache, progress=False, extractor=_borrow(fx, encoders_config()))

    _fail_loading(monkeypatch, "text")  # text features must come from the cache
    monkeypatch.setattr(embed, "load_image_encoder", lambda name, device: fx.image_encoder)
    bigger = extract_features(table, encoders_config(image={"image_size": 72}), cache, progress=False)
    assert bigger.computed == {"image": True, "text": False}
    assert bigger.image_key != base.image_key and bigger.text_key == base.text_key

    # A new encoder is one loader function plus one registry line; it gets its own cache entry.
    monkeypatch.setitem(IMAGE_ENCODERS, "tiny_test", tiny_encoder.load)
    monkeypatch.setattr(embed, "load_image_encoder", encoders.load_image_encoder)
    tiny = extract_features(table, encoders_config(image={"name": "tiny_test"}), cache, progress=False)
    assert tiny.computed == {"image": True, "text": False}
    assert tiny.image_key not in (base.image_key, bigger.image_key)
    assert np.load(tiny.image_path).shape == (10, 8)

    longer_text = encoders_config(text={"max_length": 64})
    assert extract.feature_keys(pd.read_parquet(table), longer_text, "fp32")["text"] != \
        extract.feature_keys(pd.read_parquet(table), encoders_config(), "fp32")["text"]


def test_changed_rows_change_the_key(table, tmp_path, encoders_config):
    df = pd.read_parquet(table)
    keys = extract.feature_keys(df, encoders_config(), "fp32")
    # order matters: rows align with the table
    assert extract.feature_keys(df.iloc[::-1], encoders_config(), "fp32") != keys
    edited = df.assign(text=df["text"].str.replace("bus", "tram"))
    new = extract.feature_keys(edited, encoders_config(), "fp32")
    assert new["image"] == keys["image"] and new["text"] != keys["text"]
    assert extract.feature_keys(df, encoders_config(), "bf16") != keys


def test_bytes_and_paths_give_the_same_features(table, fx):
    paths = pd.read_parquet(table)["image"].tolist()[:5]
    raw = [open(p, "rb").read() for p in paths]
    np.testing.assert_array_equal(fx.embed_images(paths), fx.embed_images(raw))
    assert fx.embed_images([]).shape == (0, 1280) and fx.embed_texts([]).shape == (0, 384)


def test_text_order_is_restored_after_length_sorting(fx):
    forward = fx.embed_texts(TEXTS)
    backward = fx.embed_texts(TEXTS[::-1])[::-1]
    np.testing.assert_allclose(forward, backward, atol=2e-3, rtol=0)
    # clean_text is applied, as in validation: invisible differences do not change the vector
    np.testing.assert_allclose(fx.embed_texts(["  two cats\u200b sleeping on a sofa \n"])[0], forward[1], atol=2e-3)


def test_decoding_workers_give_the_same_features(table, fx, encoders_config):
    paths = pd.read_parquet(table)["image"].tolist()
    with_workers = _borrow(fx, encoders_config(num_workers=2)).embed_images(paths)
    # Decoding in worker processes hands the encoder the same pixels as decoding in this process: same bits.
    np.testing.assert_array_equal(with_workers, _borrow(fx, encoders_config(num_workers=0)).embed_images(paths))
    # The CPU pipeline (a thread per core, one torch thread each) sums in another order: equal to rounding.
    np.testing.assert_allclose(with_workers, fx.embed_images(paths), rtol=0, atol=1e-4)


def test_undecodable_image_is_named(table, fx, tmp_path, encoders_config):
    with pytest.raises(ImageError, match=r"image 1 \(12 bytes\).*not a decodable image"):
        fx.embed_images([open(pd.read_parquet(table)["image"][0], "rb").read(), b"not an image"])
    df = pd.read_parquet(table)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    df.loc[3, ["image", "image_sha256"]] = [str(broken), hashlib.sha256(broken.read_bytes()).hexdigest()]
    df.to_parquet(tmp_path / "validated.parquet")
    expected = r"row id 'r3' \(.*broken.png\): not a decodable image.*re-run `crossmodal validate`"
    with pytest.raises(FeatureError, match=expected):
        extract_features(tmp_path / "validated.parquet", encoders_config(), tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").rglob("*.npy"))  # nothing half-written into the cache


def test_extractor_must_match_the_config(table, fx, tmp_path, encoders_config):
    with pytest.raises(ValueError, match="another EncodersConfig"):
        extract_features(table, encoders_config(image={"image_size": 96}), tmp_path / "cache", extractor=fx)
    with pytest.raises(ValueError, match="config names 'resnet50'"):
        FeatureExtractor(encoders_config(image={"name": "resnet50"}), image_encoder=fx.image_encoder)


def test_bad_validated_table_is_reported(table, tmp_path, encoders_config):
    with pytest.raises(FeatureError, match="not found"):
        extract_features(tmp_path / "missing.parquet", encoders_config(), tmp_path / "cache")
    pd.read_parquet(table).drop(columns=["image_sha256"]).to_parquet(tmp_path / "v.parquet")
    with pytest.raises(FeatureError, match="image_sha256"):
        extract_features(tmp_path / "v.parquet", encoders_config(), tmp_path / "cache")


def test_progress_bar_goes_to_stderr(fx, capsys):
    fx.embed_texts(TEXTS[:3], progress=True)
    captured = capsys.readouterr()
    assert "text features" in captured.err and "text features" not in captured.out
    fx.embed_texts(TEXTS[:3])
    assert "text features" not in capsys.readouterr().err


@pytest.mark.skipif(not cpu_has_fast_bf16() and not torch.cuda.is_available(), reason="no fast bf16 here")
def test_bf16_features_match_fp32(table, fx, encoders_config):
    paths = pd.read_parquet(table)["image"].tolist()
    fp32, bf16 = _borrow(fx, encoders_config(precision="fp32")), _borrow(fx, encoders_config(precision="bf16"))
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")

    def cos(a, b):
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    assert cos(fp32.embed_images(paths), bf16.embed_images(paths)).min() > 0.99
    assert cos(fp32.embed_texts(TEXTS), bf16.embed_texts(TEXTS)).min() > 0.99
