"""Batched JPEG decoding on a device (crossmodal.features.jpeg) gives the pixels of the Pillow path.

The arithmetic is the same on every device, so most of it is checked here on the CPU; the test that runs nvJPEG
on a GPU is skipped where there is no CUDA.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from crossmodal.config import EncodersConfig
from crossmodal.data.images import ImageError, image_to_tensor, load_image
from crossmodal.features.extractor import FeatureExtractor
from crossmodal.features.jpeg import decode_resize, gpu_ready_jpeg, resized_shape

SIZES = [(500, 375), (375, 500), (640, 480), (224, 224), (301, 199), (100, 80)]


def photo(w: int, h: int, seed: int = 0, mode: str = "RGB", fmt: str = "JPEG", **save) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * (c + 1) + yy * (3 - c)) % 256 for c in range(3)], axis=-1).astype(np.float64)
    arr = np.clip(arr + rng.normal(0, 10, arr.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt, **save)
    return buf.getvalue()


def as_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def pillow(data: bytes, size: int = 224) -> torch.Tensor:
    return image_to_tensor(load_image(data), size)


@pytest.mark.parametrize(("w", "h"), SIZES)
def test_device_decoding_matches_pillow(w, h):
    data = photo(w, h)
    got = decode_resize([as_tensor(data)], 224, "cpu")[0]
    diff = (got.int() - pillow(data).int()).abs().float()
    assert got.shape == (3, 224, 224) and got.dtype == torch.uint8
    # Same filter, same two passes, same rounding: at most an odd pixel off by one (float summation order).
    assert diff.mean() < 0.01 and diff.max() <= 1


def test_a_batch_of_mixed_sizes_keeps_its_order():
    datas = [photo(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    got = decode_resize([as_tensor(d) for d in datas], 96, "cpu")
    for k, d in enumerate(datas):
        assert (got[k].int() - pillow(d, 96).int()).abs().max() <= 1


def test_resized_shape_is_image_to_tensors_arithmetic():
    assert resized_shape(500, 375, 224) == (298, 224)  # 224 * 500 / 375 = 298.67, truncated like torchvision
    assert resized_shape(375, 500, 224) == (224, 298)
    assert resized_shape(100, 100, 224) == (224, 224)


def test_only_jpegs_the_device_reproduces_take_that_route():
    assert gpu_ready_jpeg(photo(64, 48), None)
    assert not gpu_ready_jpeg(photo(64, 48, fmt="PNG"), None)
    assert not gpu_ready_jpeg(photo(64, 48, mode="L"), None)  # greyscale: Pillow converts it
    assert not gpu_ready_jpeg(photo(64, 48, mode="CMYK"), None)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees: load_image turns it upright
    assert not gpu_ready_jpeg(photo(64, 48, exif=exif.tobytes()), None)
    assert not gpu_ready_jpeg(photo(64, 48), max_pixels=64 * 48 - 1)
    data = photo(64, 48)
    assert not gpu_ready_jpeg(data[: len(data) // 2], None)  # truncated: Pillow names the problem
    assert not gpu_ready_jpeg(b"\xff\xd8\xff garbage \xff\xd9", None)


def test_the_device_decoding_path_of_the_extractor_on_cpu(tmp_path, encoders_config, tiny_encoder):
    """The extractor's CUDA branch (raw JPEG bytes from the loader, decoded in batches) run on the CPU."""
    exif = Image.Exif()
    exif[0x0112] = 3
    sources = [photo(120, 90, seed=1), photo(90, 120, seed=2, fmt="PNG"), photo(120, 90, seed=3, exif=exif.tobytes()),
               photo(120, 90, seed=4, mode="L"), photo(200, 150, seed=5)]
    path = tmp_path / "a.jpg"
    path.write_bytes(photo(160, 120, seed=6))
    sources.append(str(path))
    cfg = encoders_config(image={"name": "tiny", "image_size": 64, "batch_size": 4}, precision="fp32", num_workers=0)
    cpu = FeatureExtractor(cfg, image_encoder=tiny_encoder.load("tiny", "cpu"))
    device_path = FeatureExtractor(cfg, image_encoder=tiny_encoder.load("tiny", "cpu"))  # the same seeded weights
    device_path.gpu_jpeg = True
    np.testing.assert_allclose(device_path.embed_images(sources), cpu.embed_images(sources), rtol=0, atol=0.02)

    bad = sources[:2] + [photo(120, 90)[:300]]  # cut off: Pillow decides on the CPU
    with pytest.raises(ImageError, match=r"image 2 \(300 bytes\): not a decodable image"):
        device_path.embed_images(bad)
    good = photo(120, 90)
    damaged = good[:20] + b"\x00" * 50 + good[70:]  # header and end marker intact: the device decoder rejects it
    assert gpu_ready_jpeg(damaged, None)
    with pytest.raises(ImageError, match=r"image 1 \(\d+ bytes\): image is truncated or corrupt"):
        device_path.embed_images([good, damaged, good])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_nvjpeg_on_cuda_matches_the_cpu_path(tmp_path):
    datas = [photo(w, h, seed=i) for i, (w, h) in enumerate(SIZES)]
    got = decode_resize([as_tensor(d) for d in datas], 224, "cuda").cpu()
    for k, d in enumerate(datas):
        diff = (got[k].int() - pillow(d).int()).abs().float()
        assert diff.mean() < 2.0, f"{SIZES[k]}: mean pixel difference {diff.mean():.2f}"  # IDCTs differ slightly

    paths = []
    for i, d in enumerate(datas + [photo(80, 60, fmt="PNG")]):
        paths.append(tmp_path / f"{i}.img")
        paths[-1].write_bytes(d)
    cfg = {"image": {"image_size": 224}, "precision": "fp32"}
    gpu = FeatureExtractor(EncodersConfig.model_validate({**cfg, "device": "cuda"}))
    cpu = FeatureExtractor(EncodersConfig.model_validate({**cfg, "device": "cpu"}))
    a, b = gpu.embed_images([str(p) for p in paths]), cpu.embed_images([str(p) for p in paths])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.99
