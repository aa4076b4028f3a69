"""Feature extraction and the content-addressed feature store, on a 10-row table of 48 px images."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageDraw

from crossmodal import hardware
from crossmodal.config import EncodersConfig
from crossmodal.data.images import ImageError
from crossmodal.encoders import registry as encoders
from crossmodal.encoders.image import ImageEncoder
from crossmodal.encoders.registry import IMAGE_ENCODERS
from crossmodal.errors import ConfigError, FeatureError
from crossmodal.features import extract
from crossmodal.features import extractor as embed
from crossmodal.features.extract import extract_features
from crossmodal.features.extractor import FeatureExtractor
from crossmodal.hardware import cpu_has_fast_bf16, resolve_device, resolve_precision

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


def _cfg(**enc) -> EncodersConfig:
    base = {"image": {"image_size": 64, "batch_size": 4}, "text": {"max_length": 32, "batch_size": 4}}
    for key, value in enc.items():
        base.setdefault(key, {}).update(value) if isinstance(value, dict) else base.__setitem__(key, value)
    return EncodersConfig.model_validate(base)


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
def fx():
    """One extractor (encoders loaded once) for the whole module; other extractors borrow its encoders."""
    return FeatureExtractor(_cfg())


def _borrow(fx, cfg: EncodersConfig) -> FeatureExtractor:
    return FeatureExtractor(cfg, image_encoder=fx.image_encoder, text_encoder=fx.text_encoder)


def _no_tmp_left(root) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_extract_shapes_order_and_cache_hit(table, fx, tmp_path, monkeypatch):
    cache, out = tmp_path / "cache", tmp_path / "out"
    df = pd.read_parquet(table)
    cfg = _cfg()

    first = extract_features(table, cfg, cache, out, progress=False, extractor=_borrow(fx, cfg))
    assert first.computed == {"image": True, "text": True}
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
    assert _no_tmp_left(tmp_path)

    meta_bytes = (out / "features.json").read_bytes()
    _fail_loading(monkeypatch)  # a second call must not even load an encoder
    second = extract_features(table, cfg, cache, out, progress=False)
    assert second.computed == {"image": False, "text": False}
    assert (second.image_key, second.text_key) == (first.image_key, first.text_key)
    np.testing.assert_array_equal(np.load(second.image_path), img)
    np.testing.assert_array_equal(np.load(second.text_path), txt)
    assert (out / "features.json").read_bytes() == meta_bytes  # deterministic, for DVC
    # the cache layout: cache/<kind>/<key>.npy
    assert (cache / "image" / f"{first.image_key}.npy").is_file()
    assert (cache / "text" / f"{first.text_key}.npy").is_file()
    assert json.dumps(second.to_dict())  # JSON-able for Prefect and DVC


def test_image_params_change_only_the_image_key(table, fx, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    base = extract_features(table, _cfg(), cache, progress=False, extractor=_borrow(fx, _cfg()))

    _fail_loading(monkeypatch, "text")  # text features must come from the cache
    monkeypatch.setattr(embed, "load_image_encoder", lambda name, device: fx.image_encoder)
    bigger = extract_features(table, _cfg(image={"image_size": 72}), cache, progress=False)
    assert bigger.computed == {"image": True, "text": False}
    assert bigger.image_key != base.image_key and bigger.text_key == base.text_key

    # A new encoder is one function plus one registry line; it gets its own cache entry.
    def load_tiny(name, device):
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        return ImageEncoder(name=name, module=net.eval(), dim=8, mean=(0.5,) * 3, std=(0.25,) * 3)

    monkeypatch.setitem(IMAGE_ENCODERS, "tiny_test", load_tiny)
    monkeypatch.setattr(embed, "load_image_encoder", encoders.load_image_encoder)
    tiny = extract_features(table, _cfg(image={"name": "tiny_test"}), cache, progress=False)
    assert tiny.computed == {"image": True, "text": False}
    assert tiny.image_key not in (base.image_key, bigger.image_key)
    assert np.load(tiny.image_path).shape == (10, 8)

    longer_text = _cfg(text={"max_length": 64})
    assert extract.feature_keys(pd.read_parquet(table), longer_text, "fp32")["text"] != \
        extract.feature_keys(pd.read_parquet(table), _cfg(), "fp32")["text"]


def test_changed_rows_change_the_key(table, tmp_path):
    df = pd.read_parquet(table)
    keys = extract.feature_keys(df, _cfg(), "fp32")
    assert extract.feature_keys(df.iloc[::-1], _cfg(), "fp32") != keys  # order matters: rows align with the table
    edited = df.assign(text=df["text"].str.replace("bus", "tram"))
    new = extract.feature_keys(edited, _cfg(), "fp32")
    assert new["image"] == keys["image"] and new["text"] != keys["text"]
    assert extract.feature_keys(df, _cfg(), "bf16") != keys


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


def test_decoding_workers_give_the_same_features(table, fx):
    paths = pd.read_parquet(table)["image"].tolist()
    with_workers = _borrow(fx, _cfg(num_workers=2)).embed_images(paths)
    # Decoding in worker processes hands the encoder the same pixels as decoding in this process: same bits.
    np.testing.assert_array_equal(with_workers, _borrow(fx, _cfg(num_workers=0)).embed_images(paths))
    # The CPU pipeline (a thread per core, one torch thread each) sums in another order: equal to rounding.
    np.testing.assert_allclose(with_workers, fx.embed_images(paths), rtol=0, atol=1e-4)


def test_undecodable_image_is_named(table, fx, tmp_path):
    with pytest.raises(ImageError, match=r"image 1 \(12 bytes\).*not a decodable image"):
        fx.embed_images([open(pd.read_parquet(table)["image"][0], "rb").read(), b"not an image"])
    df = pd.read_parquet(table)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    df.loc[3, ["image", "image_sha256"]] = [str(broken), hashlib.sha256(broken.read_bytes()).hexdigest()]
    df.to_parquet(tmp_path / "validated.parquet")
    expected = r"row id 'r3' \(.*broken.png\): not a decodable image.*re-run `crossmodal validate`"
    with pytest.raises(FeatureError, match=expected):
        extract_features(tmp_path / "validated.parquet", _cfg(), tmp_path / "cache", progress=False)
    assert not list((tmp_path / "cache").rglob("*.npy"))  # nothing half-written into the cache


def test_extractor_must_match_the_config(table, fx, tmp_path):
    with pytest.raises(ValueError, match="another EncodersConfig"):
        extract_features(table, _cfg(image={"image_size": 96}), tmp_path / "cache", extractor=fx)
    with pytest.raises(ValueError, match="config names 'resnet50'"):
        FeatureExtractor(_cfg(image={"name": "resnet50"}), image_encoder=fx.image_encoder)


def test_bad_validated_table_is_reported(table, tmp_path):
    with pytest.raises(FeatureError, match="not found"):
        extract_features(tmp_path / "missing.parquet", _cfg(), tmp_path / "cache")
    pd.read_parquet(table).drop(columns=["image_sha256"]).to_parquet(tmp_path / "v.parquet")
    with pytest.raises(FeatureError, match="image_sha256"):
        extract_features(tmp_path / "v.parquet", _cfg(), tmp_path / "cache")


def test_progress_bar_goes_to_stderr(fx, capsys):
    fx.embed_texts(TEXTS[:3], progress=True)
    captured = capsys.readouterr()
    assert "text features" in captured.err and "text features" not in captured.out
    fx.embed_texts(TEXTS[:3])
    assert "text features" not in capsys.readouterr().err


def test_device_and_precision_resolution(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda")
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", cpu) is None  # fp32 fallback where bf16 would be emulated
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", cpu) is torch.bfloat16


@pytest.mark.skipif(not cpu_has_fast_bf16() and not torch.cuda.is_available(), reason="no fast bf16 here")
def test_bf16_features_match_fp32(table, fx):
    paths = pd.read_parquet(table)["image"].tolist()
    fp32, bf16 = _borrow(fx, _cfg(precision="fp32")), _borrow(fx, _cfg(precision="bf16"))
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")

    def cos(a, b):
        return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)

    assert cos(fp32.embed_images(paths), bf16.embed_images(paths)).min() > 0.99
    assert cos(fp32.embed_texts(TEXTS), bf16.embed_texts(TEXTS)).min() > 0.99


def test_auto_batch_sizes_and_workers(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert hardware.auto_batch_size("image", "auto", cpu) == 8 and hardware.auto_batch_size("image", "auto", gpu) == 256
    assert hardware.auto_batch_size("text", "auto", cpu) == 64 and hardware.auto_batch_size("text", 7, gpu) == 7
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert hardware.auto_num_workers("auto", cpu, 1, 32) == 0  # one request: starting workers costs more than it saves
    assert hardware.auto_num_workers("auto", cpu, 1000, 32) == 8  # half the cores: the encoder needs the rest
    assert hardware.auto_num_workers("auto", gpu, 1000, 32) == 16
    assert hardware.auto_num_workers(3, cpu, 1, 32) == 3
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert hardware.auto_num_workers("auto", cpu, 1000, 32) == 1
    with pytest.raises(ConfigError, match="encoders.image.batch_size"):
        from crossmodal.config import from_dict

        from_dict({"encoders": {"image": {"batch_size": 0}}})
