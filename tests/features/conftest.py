"""Fixtures for the feature tests: small encoder settings, a tiny stand-in image encoder, a counting stand-in
extractor, leftover temporary files."""

from __future__ import annotations

import hashlib
import itertools
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from crossmodal.config import EncodersConfig

# Source text, so that a subprocess (the killed extraction of test_extract_resume.py) runs the very same encoder.
TINY_ENCODER = textwrap.dedent("""
    import time, torch
    from crossmodal.encoders.image import ImageEncoder

    class Tiny(torch.nn.Module):
        def __init__(self, delay=0.0):
            super().__init__()
            torch.manual_seed(0)
            self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
            self.delay, self.seen = delay, 0

        def forward(self, x):
            time.sleep(self.delay)
            self.seen += len(x)
            return self.net(x)

    def tiny_encoder(name, device, delay=0.0):
        return ImageEncoder(name=name, module=Tiny(delay).eval(), dim=8, mean=(0.5,) * 3, std=(0.25,) * 3,
                            channels_last=False)
""")


def _encoders_config(**enc) -> EncodersConfig:
    """64 px images and 32-token texts in batches of 4; ``enc`` overrides: a mapping updates its section
    (``image={"image_size": 72}``), any other value replaces the setting (``precision="fp32"``)."""
    base = {"image": {"image_size": 64, "batch_size": 4}, "text": {"max_length": 32, "batch_size": 4}}
    for key, value in enc.items():
        if isinstance(value, dict):
            base.setdefault(key, {}).update(value)
        else:
            base[key] = value
    return EncodersConfig.model_validate(base)


class CountingExtractor:
    """Stands in for FeatureExtractor in ``extract_features``: each input's features are drawn from its content (an
    image file's bytes, a text) plus a stamp of the call that encoded it, so an item encoded twice gets other bits;
    ``images``/``texts`` list every input it was given. ``fail_after``: raise after that many batches (a crash)."""

    image_dim, text_dim, device = 6, 4, "cpu"
    _stamps = itertools.count(1)  # shared by every instance: no two calls anywhere stamp alike

    def __init__(self, cfg, batch: int = 3, fail_after: int | None = None):
        self.cfg, self.batch, self.fail_after = cfg, batch, fail_after
        self.images: list[str] = []
        self.texts: list[str] = []

    def _rows(self, inputs: list[bytes], dim: int, stamp: int) -> np.ndarray:
        rows = [np.random.default_rng(int.from_bytes(hashlib.sha256(x).digest()[:8], "little")).standard_normal(dim)
                for x in inputs]
        return (np.stack(rows) + stamp * 1e-3).astype(np.float32)

    def _batches(self, inputs: list, seen: list, dim: int, read):
        stamp = next(self._stamps)
        for n, i in enumerate(range(0, len(inputs), self.batch)):
            if self.fail_after is not None and n >= self.fail_after:
                raise RuntimeError("the stand-in extractor crashed")
            seen += inputs[i : i + self.batch]
            yield self._rows([read(x) for x in inputs[i : i + self.batch]], dim, stamp)

    def iter_image_features(self, sources, progress=False, names=None):
        return self._batches(list(sources), self.images, self.image_dim, lambda p: Path(p).read_bytes())

    def iter_text_features(self, texts, progress=False, chunk=4096):
        return self._batches(list(texts), self.texts, self.text_dim, lambda t: t.encode())


def _tmp_files(root: Path) -> list[Path]:
    return [p for p in Path(root).rglob("*") if p.name.endswith(".tmp")]


@pytest.fixture(scope="session")
def encoders_config():
    """``encoders_config(**overrides)``: small EncodersConfig for fast extraction."""
    return _encoders_config


@pytest.fixture(scope="session")
def tiny_encoder():
    """A tiny convolutional image encoder (8 features, seeded) standing in for EfficientNet: ``load(name, device,
    delay=0.0)`` builds it like any loader in the encoder registry (its module counts the images it has seen in
    ``seen``; ``delay`` slows each batch), ``source`` is its code for a subprocess."""
    namespace: dict = {}
    exec(TINY_ENCODER, namespace)
    return SimpleNamespace(load=namespace["tiny_encoder"], source=TINY_ENCODER)


@pytest.fixture(scope="session")
def tmp_files():
    """``tmp_files(root)``: the temporary files (``*.tmp``) left anywhere under ``root``."""
    return _tmp_files


@pytest.fixture(scope="session")
def counting_extractor():
    """``counting_extractor(cfg, batch=3, fail_after=None)``: a stand-in extractor (see ``CountingExtractor``)."""
    return CountingExtractor


@pytest.fixture(scope="session")
def text_encoder():
    """The real MiniLM text encoder, loaded once."""
    from crossmodal.encoders.registry import load_text_encoder

    return load_text_encoder("all-MiniLM-L6-v2", "cpu")


@pytest.fixture
def fx(monkeypatch, text_encoder, tiny_encoder, cfg):
    """A FeatureExtractor for the test module's ``cfg``: the tiny image encoder (as ``tiny_test``) and MiniLM."""
    from crossmodal.encoders.registry import IMAGE_ENCODERS
    from crossmodal.features.extractor import FeatureExtractor

    monkeypatch.setitem(IMAGE_ENCODERS, "tiny_test", tiny_encoder.load)
    return FeatureExtractor(cfg, image_encoder=tiny_encoder.load("tiny_test", "cpu"), text_encoder=text_encoder)
