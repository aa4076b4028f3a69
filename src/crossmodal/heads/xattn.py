"""The fine-tuned cross-attention model: tuned encoder layers and a bidirectional cross-attention head, raw inputs in.

:class:`FinetunedXattn` keeps the image CNN's last spatial feature map as a grid of cells and the text
transformer's per-token states; in :class:`CrossAttentionHead` text tokens attend over grid cells and grid cells
over text tokens, then both are pooled and classified. Only the last ``image_blocks`` / ``text_layers`` and the
head are trained; a learned placeholder token stands in for an absent image or text. Training is
``crossmodal.training.finetune``; serving is ``crossmodal.serving.fused_model.FinetunedFusedModel``.

Usage::

    from crossmodal.heads.xattn import load_finetuned
    from crossmodal.heads.xattn_inputs import prepare_inputs, predict_proba
    model, meta = load_finetuned("work/models/finetune_xattn")        # FinetunedXattn in eval mode
    args = meta["init_args"]
    inputs = prepare_inputs(images, texts, model.text.tokenizer, args["image_size"], args["max_length"])
    proba = predict_proba(model, inputs)                  # (N, C); an image or text may be None (absent)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from crossmodal.artifacts import HEAD_FILE, WEIGHTS_FILE
from crossmodal.config import FinetuneConfig
from crossmodal.errors import FinetuneError
from crossmodal.hardware import autocast
from crossmodal.heads.xattn_inputs import Inputs

if TYPE_CHECKING:
    from crossmodal.encoders.image import ImageEncoder
    from crossmodal.encoders.text import TextEncoder

log = logging.getLogger(__name__)

NAME = "finetune_xattn"
MAX_GRID = 64  # learned row/column position embeddings: grids up to 64 x 64 cells (2048 px at stride 32)


# ---------------------------------------------------------------------------------------------- the model
def _unit(*modules: nn.Module) -> nn.Module:
    return modules[0] if len(modules) == 1 else nn.Sequential(*modules)


def image_units(module: nn.Module, name: str) -> list[nn.Module]:
    """The CNN as an ordered list of blocks whose composition maps an image to its last spatial feature map.

    EfficientNet-Lite0 (timm): stem, its 16 MBConv blocks one by one, the 1x1 head convolution. torchvision:
    the children of ``features`` (EfficientNet, MobileNet, ConvNeXt, VGG, DenseNet...) or the ResNet stages.
    """
    if hasattr(module, "conv_stem") and hasattr(module, "blocks") and hasattr(module, "conv_head"):  # timm
        blocks = [b for stage in module.blocks for b in stage]
        return [_unit(module.conv_stem, module.bn1), *blocks, _unit(module.conv_head, module.bn2)]
    features = getattr(module, "features", None)
    if isinstance(features, nn.Sequential):
        return list(features.children())
    if all(hasattr(module, a) for a in ("conv1", "bn1", "relu", "maxpool", "layer4")):  # ResNet family
        return [_unit(module.conv1, module.bn1, module.relu, module.maxpool),
                module.layer1, module.layer2, module.layer3, module.layer4]
    raise FinetuneError(
        f"image encoder {name!r} has no spatial feature map that fine-tuning knows how to reach; use "
        "efficientnet_lite0 or a torchvision CNN (resnet*, efficientnet_*, mobilenet_*, convnext_*, ...), or "
        f"leave {NAME} out of train.heads"
    )


class ImageTower(nn.Module):
    """uint8 images (N, 3, S, S) -> normalised -> the CNN's last feature map (N, C, h, w)."""

    def __init__(self, encoder: ImageEncoder, tuned_blocks: int):
        super().__init__()
        units = image_units(encoder.module, encoder.name)
        self.units = nn.ModuleList(units)
        self.channels_last = encoder.channels_last
        # (x/255 - mean)/std == (x - 255 mean) / (255 std): one fused op on the uint8 input, as in
        # crossmodal.features.extractor.
        self.register_buffer("shift", torch.tensor(encoder.mean).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("scale", torch.tensor(encoder.std).view(1, 3, 1, 1) * 255, persistent=False)
        self.tuned = list(range(len(units) - min(tuned_blocks, len(units)), len(units)))
        with torch.no_grad():
            self.channels = int(self._grid(torch.zeros(1, 3, 64, 64, dtype=torch.uint8)).shape[1])

    @property
    def first_tuned(self) -> int:
        return self.tuned[0] if self.tuned else len(self.units)

    def _grid(self, x: torch.Tensor, start: int = 0, stop: int | None = None) -> torch.Tensor:
        if start == 0:
            x = (x.float() - self.shift) / self.scale
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        for unit in self.units[start:stop]:
            x = unit(x)
        return x

    def frozen_prefix(self, x: torch.Tensor) -> torch.Tensor | None:
        """The output of the frozen blocks (fixed during training, so computed once per image); None if none is."""
        return self._grid(x, 0, self.first_tuned) if self.first_tuned > 0 else None

    def forward(self, x: torch.Tensor | None, prefix: torch.Tensor | None = None) -> torch.Tensor:
        return self._grid(x) if prefix is None else self._grid(prefix, self.first_tuned)


def _layer_list(model: nn.Module, name: str) -> tuple[str, nn.ModuleList]:
    """The transformer's stack of layers: the ModuleList as long as ``config.num_hidden_layers``."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layers", None)
    for qualname, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n:
            return qualname, mod
    raise FinetuneError(f"text encoder {name!r}: cannot find its list of {n} transformer layers to fine-tune; "
                        "use a BERT-family model (MiniLM, BERT, RoBERTa, DistilBERT...)")


class TextTower(nn.Module):
    """Token ids + attention mask -> the transformer's last hidden states (N, L, D)."""

    def __init__(self, encoder: TextEncoder, tuned_layers: int):
        super().__init__()
        self.model = encoder.model
        self.dim = int(encoder.dim)
        self.tokenizer, self.max_positions = encoder.tokenizer, int(encoder.max_positions)  # not modules: no state
        self.layer_path, layers = _layer_list(self.model, encoder.name)
        self.tuned = list(range(len(layers) - min(tuned_layers, len(layers)), len(layers)))

    @property
    def first_tuned(self) -> int:
        layers = self.model.get_submodule(self.layer_path)
        return self.tuned[0] if self.tuned else len(layers)

    def frozen_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor | None:
        """Hidden states after the frozen layers (N, L, D), or None when no layer is frozen."""
        k = self.first_tuned
        if k == 0:
            return None
        layers = self.model.get_submodule(self.layer_path)
        seen: dict[str, Any] = {}

        def grab(module, args, output):
            seen["tuple"] = isinstance(output, tuple)
            seen["hidden"] = output[0] if isinstance(output, tuple) else output
            raise _StopForward

        handle = layers[k - 1].register_forward_hook(grab)
        try:
            self.model(input_ids=input_ids, attention_mask=attention_mask)
        except _StopForward:
            pass
        finally:
            handle.remove()
        self._tuple_out = seen["tuple"]
        return seen["hidden"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                prefix: torch.Tensor | None = None) -> torch.Tensor:
        if prefix is None:
            return self.model(input_ids=input_ids, attention_mask=attention_mask)[0]
        # The frozen layers' output is known: they are swapped for stand-ins that hand it on, so the model's own
        # code still builds the attention mask and runs the tuned layers (works for any layer signature).
        layers = self.model.get_submodule(self.layer_path)
        k = self.first_tuned
        frozen = [layers[i] for i in range(k)]
        tuple_out = getattr(self, "_tuple_out", False)
        for i in range(k):
            layers[i] = _Replay(prefix if i == 0 else None, tuple_out)
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask)[0]
        finally:
            for i, layer in enumerate(frozen):
                layers[i] = layer


class _StopForward(Exception):
    """Raised by a hook once the frozen layers' output is captured: the rest of the forward pass is not needed."""


class _Replay(nn.Module):
    """Stands in for a frozen transformer layer: returns the cached output (first layer) or passes it on."""

    def __init__(self, cached: torch.Tensor | None, tuple_out: bool):
        super().__init__()
        self.cached, self.tuple_out = cached, tuple_out

    def forward(self, hidden_states, *args, **kwargs):
        out = hidden_states if self.cached is None else self.cached.to(hidden_states.dtype)
        return (out,) if self.tuple_out else out


class CrossAttentionBlock(nn.Module):
    """Pre-norm, bidirectional: text tokens attend over grid cells and grid cells over text tokens, then MLPs."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.norm_text, self.norm_image = nn.LayerNorm(d), nn.LayerNorm(d)
        self.text_to_image = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.image_to_text = nn.MultiheadAttention(d, heads, dropout=dropout, batch_first=True)
        self.ff_text = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(dropout),
                                     nn.Linear(2 * d, d))
        self.ff_image = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.GELU(), nn.Dropout(dropout),
                                      nn.Linear(2 * d, d))

    def forward(self, text, image, text_padding):
        t, i = self.norm_text(text), self.norm_image(image)
        # Both directions read the states from before this layer (symmetric, neither side goes first).
        text = text + self.text_to_image(t, i, i, need_weights=False)[0]
        image = image + self.image_to_text(i, t, t, key_padding_mask=text_padding, need_weights=False)[0]
        return text + self.ff_text(text), image + self.ff_image(image)


class CrossAttentionHead(nn.Module):
    """Grid (N, C, h, w) + tokens (N, L, Dt) -> logits (N, classes), with placeholders for absent modalities."""

    def __init__(self, image_channels: int, text_dim: int, num_classes: int, model_dim: int = 128,
                 layers: int = 1, heads: int = 4, dropout: float = 0.1):
        super().__init__()
        d = model_dim
        self.image_proj, self.text_proj = nn.Linear(image_channels, d), nn.Linear(text_dim, d)
        self.row_embed = nn.Parameter(torch.randn(MAX_GRID, d) * 0.02)  # where a cell sits in the grid
        self.col_embed = nn.Parameter(torch.randn(MAX_GRID, d) * 0.02)
        self.image_placeholder = nn.Parameter(torch.randn(d) * 0.02)  # stands in for an absent image
        self.text_placeholder = nn.Parameter(torch.randn(d) * 0.02)  # ... and for an absent text
        self.blocks = nn.ModuleList(CrossAttentionBlock(d, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(2 * d)
        self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * d, num_classes))

    def forward(self, grid, tokens, attention_mask, image_missing, text_missing):
        n, _, h, w = grid.shape
        if h > MAX_GRID or w > MAX_GRID:
            raise FinetuneError(f"image feature grid {h}x{w} exceeds {MAX_GRID}x{MAX_GRID}; lower finetune.image_size")
        image = self.image_proj(grid.flatten(2).transpose(1, 2).float())  # (N, h*w, d)
        image = image + (self.row_embed[:h, None] + self.col_embed[None, :w]).reshape(h * w, -1)
        text = self.text_proj(tokens.float())  # (N, L, d)
        # An absent modality is one placeholder token: every cell (or the first token) holds it, the rest is masked.
        image = torch.where(image_missing[:, None, None], self.image_placeholder.to(image.dtype), image)
        text = torch.where(text_missing[:, None, None], self.text_placeholder.to(text.dtype), text)
        valid = attention_mask.bool() & ~text_missing[:, None]
        valid[:, 0] |= text_missing
        for block in self.blocks:
            text, image = block(text, image, ~valid)
        m = valid.unsqueeze(-1).to(text.dtype)
        text_pool = (text * m).sum(1) / m.sum(1).clamp(min=1)
        return self.classifier(self.norm(torch.cat([image.mean(1), text_pool], dim=1)))


class FinetunedXattn(nn.Module):
    """Image tower + text tower + cross-attention head; ``init_args`` rebuild it (with the pretrained encoders)."""

    modality = "fusion"

    def __init__(self, image_encoder: ImageEncoder, text_encoder: TextEncoder, num_classes: int,
                 cfg: FinetuneConfig):
        super().__init__()
        self.image = ImageTower(image_encoder, cfg.image_blocks)
        self.text = TextTower(text_encoder, cfg.text_layers)
        self.head = CrossAttentionHead(self.image.channels, self.text.dim, num_classes, cfg.model_dim,
                                       cfg.fusion_layers, cfg.attention_heads, cfg.dropout)
        self.init_args = {"name": NAME, "image_encoder": image_encoder.name, "text_encoder": text_encoder.name,
                          "num_classes": int(num_classes), **architecture(cfg)}
        for p in self.parameters():
            p.requires_grad_(False)
        for module in self.tuned_modules():
            for p in module.parameters():
                p.requires_grad_(True)
        for p in self.head.parameters():
            p.requires_grad_(True)

    def tuned_modules(self) -> list[nn.Module]:
        layers = self.text.model.get_submodule(self.text.layer_path)
        return [self.image.units[i] for i in self.image.tuned] + [layers[i] for i in self.text.tuned]

    def tuned_prefixes(self) -> tuple[str, ...]:
        """State-dict prefixes of what training changes: the tuned blocks and layers, and the head."""
        return (*(f"image.units.{i}." for i in self.image.tuned),
                *(f"text.model.{self.text.layer_path}.{i}." for i in self.text.tuned), "head.")

    def trained_state(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers (BatchNorm statistics too) of the tuned parts: what a checkpoint must hold."""
        prefixes = self.tuned_prefixes()
        return {k: v for k, v in self.state_dict().items() if k.startswith(prefixes)}

    def train(self, mode: bool = True) -> FinetunedXattn:
        # Frozen layers stay in eval mode: pretrained BatchNorm statistics and no dropout, like a feature extractor.
        super().train(False)
        if mode:
            self.head.train()
            for module in self.tuned_modules():
                module.train()
        self.training = mode
        return self

    def forward(self, pixels, input_ids, attention_mask, image_missing, text_missing, image_prefix=None,
                text_prefix=None):
        grid = self.image(pixels, image_prefix)
        tokens = self.text(input_ids, attention_mask, text_prefix)
        return self.head(grid, tokens, attention_mask, image_missing, text_missing)

    @torch.inference_mode()
    def cache_frozen(self, inputs: Inputs, batch_size: int, dtype: torch.dtype | None) -> Inputs:
        """``inputs`` with the frozen layers' outputs computed once (training then runs only the tuned layers).

        The text cache is checked on the first batch against a full forward pass; on a mismatch (a model whose
        layers do not compose as expected) the text tower simply runs in full.
        """
        device = next(self.head.parameters()).device
        was_training = self.training
        self.eval()
        image_parts, text_parts, text_ok = [], [], True
        for idx in torch.arange(len(inputs)).split(batch_size):
            pixels = inputs.pixels[idx].to(device)
            ids, mask = inputs.input_ids[idx].to(device), inputs.attention_mask[idx].to(device)
            with autocast(device, dtype):
                grid = self.image.frozen_prefix(pixels)
                if grid is not None:
                    image_parts.append(grid.float().cpu())
                if text_ok:
                    hidden = self.text.frozen_prefix(ids, mask)
                    if hidden is None:
                        text_ok = False
                    elif not text_parts:  # first batch: the replay must reproduce the full model
                        full, replayed = self.text(ids, mask), self.text(ids, mask, hidden)
                        valid = mask.bool()
                        text_ok = bool(torch.allclose(full[valid].float(), replayed[valid].float(), atol=1e-3,
                                                      rtol=1e-3))
                        if not text_ok:
                            log.warning("%s: text layers do not replay exactly; running the text tower in full",
                                        NAME)
                    if text_ok:
                        text_parts.append(hidden.float().cpu())
        self.train(was_training)
        cached = Inputs(inputs.pixels, inputs.input_ids, inputs.attention_mask, inputs.image_missing,
                        inputs.text_missing)
        cached.image_prefix = torch.cat(image_parts) if image_parts else None
        cached.text_prefix = torch.cat(text_parts) if text_ok and text_parts else None
        return cached


def architecture(cfg: FinetuneConfig) -> dict[str, Any]:
    """The settings that shape the model and its inputs (what ``init_args`` records besides names and classes)."""
    keys = ("image_blocks", "text_layers", "model_dim", "fusion_layers", "attention_heads", "dropout",
            "image_size", "max_length")
    return {k: getattr(cfg, k) for k in keys}


def build_model(init_args: dict[str, Any], device: torch.device | str = "cpu") -> FinetunedXattn:
    """A fresh model from ``init_args``: pretrained encoders by name, a newly initialised head."""
    from crossmodal.encoders.registry import load_image_encoder, load_text_encoder

    arch = FinetuneConfig(**{k: init_args[k] for k in architecture(FinetuneConfig())})
    image = load_image_encoder(init_args["image_encoder"], "cpu")
    text = load_text_encoder(init_args["text_encoder"], "cpu")
    return FinetunedXattn(image, text, init_args["num_classes"], arch).to(device)


# ---------------------------------------------------------------------------------------------- saving and loading
def load_trained(model: FinetunedXattn, trained: dict[str, torch.Tensor], source: Path) -> None:
    """Load the tuned layers + head; every expected tensor must be there and nothing else (no silent mismatch)."""
    expected = set(model.trained_state())
    missing, unexpected = sorted(expected - set(trained)), sorted(set(trained) - expected)
    if missing or unexpected:
        raise FinetuneError(f"{source} does not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
                            f" ({len(missing)} / {len(unexpected)} in all); retrain with `crossmodal train`")
    model.load_state_dict(trained, strict=False)


def save_finetuned(model: FinetunedXattn, directory: str | Path, info: dict | None = None) -> Path:
    """``weights.safetensors`` (tuned layers + head) and ``head.json`` (name, modality, init_args + ``info``)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.trained_state().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"head": NAME})
    meta = {"name": NAME, "modality": model.modality, "family": "finetuned", "init_args": model.init_args,
            **(info or {})}
    (directory / HEAD_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_finetuned(directory: str | Path, device: torch.device | str = "cpu") -> tuple[FinetunedXattn, dict]:
    """Rebuild the model from ``head.json`` (pretrained encoders by name) and load the trained tensors; eval mode."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for fname in (HEAD_FILE, WEIGHTS_FILE):
        if not (directory / fname).is_file():
            raise FileNotFoundError(f"{directory / fname} is missing; run `crossmodal train` to create the head")
    meta = json.loads((directory / HEAD_FILE).read_text())
    model = build_model(meta["init_args"], device)
    load_trained(model, {k: v.to(device) for k, v in load_file(str(directory / WEIGHTS_FILE)).items()},
                  directory / WEIGHTS_FILE)
    return model.eval(), meta
