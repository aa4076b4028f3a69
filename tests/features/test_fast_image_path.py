"""The image encoder's inference graph: BatchNorm folded into convolutions, checked, and never applied blindly."""

from __future__ import annotations

import torch
from torch import nn

from crossmodal.encoders.image import fold_batchnorm


def _randomise_bn(model: nn.Module) -> nn.Module:
    """Non-trivial running statistics and affine parameters, so a wrong fold shows in the output."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.3)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


class Ordered(nn.Module):
    """conv, bn, relu, conv, bn: defined in the order they run."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))).mean((2, 3))


class Shuffled(nn.Module):
    """bn1 is defined right after conv2 but normalises conv1's output: folding by definition order would be wrong."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)

    def forward(self, x):
        return self.conv2(torch.relu(self.bn1(self.conv1(x)))).mean((2, 3))


def test_fold_matches_the_original_and_leaves_it_untouched():
    model = _randomise_bn(Ordered())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded, count = fold_batchnorm(model)
    assert count == 2
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(4, 3, 16, 16)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # a copy was folded
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 2


def test_a_network_not_defined_in_run_order_is_returned_unchanged():
    model = _randomise_bn(Shuffled())
    folded, count = fold_batchnorm(model)
    assert count == 0 and folded is model


def test_the_shipped_encoder_folds_and_gives_the_same_features():
    from crossmodal.encoders.registry import load_image_encoder

    enc = load_image_encoder("efficientnet_lite0", "cpu")
    folded, count = fold_batchnorm(enc.module)
    assert count == 49  # every conv + BatchNormAct pair of EfficientNet-Lite0; the activations stay
    x = torch.rand(2, 3, 96, 96).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(folded(x), enc.module(x), rtol=1e-3, atol=1e-4)


def test_the_extractor_runs_the_folded_copy_and_keeps_the_encoder_intact():
    from crossmodal.config import EncodersConfig
    from crossmodal.features.extractor import FeatureExtractor

    fx = FeatureExtractor(EncodersConfig(device="cpu", precision="fp32"))
    assert any(isinstance(m, nn.BatchNorm2d) for m in fx.image_encoder.module.modules())
    assert fx.image_module is not fx.image_encoder.module
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fx.image_module.modules())
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    mean = torch.tensor(fx.image_encoder.mean).view(1, 3, 1, 1)
    std = torch.tensor(fx.image_encoder.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        want = fx.image_encoder.module((x / 255 - mean) / std).numpy()
    torch.testing.assert_close(torch.from_numpy(fx.forward_images(x)), torch.from_numpy(want), rtol=1e-3, atol=1e-4)


def test_resize_computes_what_pillow_computes():
    """image_to_tensor resizes with torch's uint8 antialiased bicubic: Pillow's pixels to within a level or two."""
    import io

    import numpy as np
    from PIL import Image

    from crossmodal.data.images import image_to_tensor

    def pillow(img, size):
        w, h = img.size
        new_w, new_h = (size, max(size, int(size * h / w))) if w <= h else (max(size, int(size * w / h)), size)
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return torch.from_numpy(np.array(img.crop((left, top, left + size, top + size)))).permute(2, 0, 1)

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:375, 0:500]
    photo = np.stack([(xx * 0.4 + yy * 0.2) % 256, (xx * 0.1 + 60) % 256, (yy * 0.5) % 256], -1)
    photo = np.clip(photo + rng.normal(0, 10, photo.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="JPEG", quality=90)
    images = [Image.open(io.BytesIO(buf.getvalue())).convert("RGB")]
    images += [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
               for h, w in ((100, 80), (136, 136), (1000, 3000), (224, 224), (50, 400))]
    for size in (224, 96):
        for img in images:
            got, want = image_to_tensor(img, size), pillow(img, size)
            assert got.shape == want.shape == (3, size, size) and got.dtype == torch.uint8 and got.is_contiguous()
            diff = (got.int() - want.int()).abs()
            assert diff.max() <= 2 and diff.float().mean() < 0.01, (img.size, size)


def test_the_cpu_thread_pipeline_gives_every_row_in_order_and_names_a_bad_image(tmp_path):
    """The threaded CPU path (num_workers: auto, more than two batches) against the DataLoader path, row for row."""
    import numpy as np
    import pytest
    from PIL import Image

    from crossmodal.config import EncodersConfig
    from crossmodal.data.images import ImageError
    from crossmodal.features.extractor import FeatureExtractor
    from crossmodal.hardware import cpu_threads

    rng = np.random.default_rng(0)
    paths = []
    for i in range(43):  # not a multiple of the batch: the last batch is short
        path = tmp_path / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (40 + i, 60, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    cfg = {"device": "cpu", "precision": "fp32", "image": {"image_size": 64, "batch_size": 4}}
    threaded = FeatureExtractor(EncodersConfig.model_validate({**cfg, "num_workers": "auto"}))
    assert cpu_threads("auto", threaded.device, len(paths), 4) >= 1
    serial = FeatureExtractor(EncodersConfig.model_validate({**cfg, "num_workers": 0}),
                              image_encoder=threaded.image_encoder)
    got, want = threaded.embed_images(paths), serial.embed_images(paths)
    assert got.shape == want.shape == (43, threaded.image_dim)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # 1 vs 2 torch threads: float summation order

    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    bad = paths[:30] + [str(tmp_path / "bad.jpg")] + paths[30:]
    with pytest.raises(ImageError, match=r"image 30 \(.*bad\.jpg\)"):
        threaded.embed_images(bad)
    first = next(threaded.iter_image_features(paths))  # a consumer that stops early does not hang
    assert first.shape == (4, threaded.image_dim)
