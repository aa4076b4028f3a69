"""Fixtures for the feature tests: small encoder settings, a tiny stand-in image encoder, leftover temporary files."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

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
