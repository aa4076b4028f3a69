"""Typed configuration: every knob of the pipeline, read from ``params.yaml``.

    from crossmodal.config import load_config
    cfg = load_config("params.yaml", {"train.lr": 0.01})   # defaults where the file or a key is absent
    cfg.train.lr, cfg.encoders.image.name

The CLI, the Prefect flows and ``dvc.yaml`` all read the same file through :func:`load_config`, so a value means
the same thing wherever it is used. Unknown keys are rejected (``extra="forbid"``): a typo in ``params.yaml`` is a
ConfigError that names the key, not a setting silently ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from crossmodal.errors import ConfigError

HEAD_NAMES = ("image_only", "text_only", "concat", "gated", "add", "late", "attention", "stacking",
              "finetune_xattn", "traditional_text", "traditional_image", "traditional_concat")
FINETUNED_HEADS = ("finetune_xattn",)  # trained end to end from raw inputs (crossmodal.training.finetune), not on features
UNIMODAL_HEADS = ("image_only", "text_only")
# Baselines fitted with scikit-learn on handcrafted features (crossmodal.training.traditional): compared, never registered.
TRADITIONAL_HEADS = ("traditional_text", "traditional_image", "traditional_concat")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Columns(_Section):
    """Names of the manifest's columns. ``id``, ``split`` and ``group`` are optional."""

    image: str = "image"
    text: str = "text"
    label: str = "label"
    id: str = "id"
    split: str = "split"
    group: str = "group"


class SplitConfig(_Section):
    """Used only when the manifest has no split column: a stratified, grouped split by seed."""

    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    seed: int = 42


class DataConfig(_Section):
    manifest: str = "data/demo/manifest.csv"
    data_root: str | None = None  # default: the manifest's folder
    columns: Columns = Columns()
    split: SplitConfig = SplitConfig()


class DemoConfig(_Section):
    """The embedded demo dataset (see ``crossmodal.data.demo``)."""

    rows: int = Field(1500, ge=60, le=20000)
    seed: int = 7
    image_size: int = Field(96, ge=32, le=512)
    label_noise: float = Field(0.02, ge=0, lt=0.5)
    bad_rows: bool = True  # append a few deliberately broken rows to show the quarantine


class ValidationConfig(_Section):
    max_quarantine_fraction: float = Field(0.2, ge=0, le=1)
    min_text_chars: int = Field(1, ge=0)
    # A memory guard, not a content rule: longer captions are kept and cut by the tokenizer (one warning per run).
    max_text_chars: int = Field(2_000_000, ge=1)
    max_image_bytes: int = Field(25_000_000, ge=1)
    max_image_pixels: int = Field(50_000_000, ge=1)  # decompression-bomb guard
    min_rows_per_class: int = Field(2, ge=1)
    labels: list[str] | None = None  # the allowed labels; None accepts any label
    # Rows whose image or text is absent (null/empty cell): quarantined ("none") or kept with that modality
    # missing. A row with neither is always quarantined.
    allow_missing: Literal["none", "image", "text", "either"] = "none"
    # How labels are compared: none (as written), strip (surrounding spaces dropped), strip_lower (also inner
    # whitespace collapsed and lower-cased, so "Cat", "cat " and "CAT" are one class). Labels that still differ
    # only by case or spaces are reported as a warning.
    normalize_labels: Literal["none", "strip", "strip_lower"] = "strip"


class ImageEncoderConfig(_Section):
    name: str = "efficientnet_lite0"
    image_size: int = Field(224, ge=32, le=1024)
    # auto: 8 on a CPU, 256 on a GPU, halved whenever the GPU runs out of memory (an int is the starting size)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"


class TextEncoderConfig(_Section):
    name: str = "all-MiniLM-L6-v2"
    max_length: int = Field(128, ge=8, le=4096)
    batch_size: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"  # auto: 64 on a CPU, 512 on a GPU, halved on OOM


class EncodersConfig(_Section):
    image: ImageEncoderConfig = ImageEncoderConfig()
    text: TextEncoderConfig = TextEncoderConfig()
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 where the hardware is fast at it
    # Image decoding worker processes; 0 decodes in the main process. auto: one per CPU core on a GPU machine,
    # half the cores on a CPU-only one (the encoder needs the rest); 0 for inputs of a batch or two.
    num_workers: Annotated[int, Field(ge=0)] | Literal["auto"] = "auto"


class StackingConfig(_Section):
    """Stacking late fusion: a meta-classifier on the unimodal heads' out-of-fold probabilities."""

    meta: Literal["logistic", "mlp"] = "logistic"
    folds: int = Field(5, ge=2, le=20)  # K of the K-fold on the train split that makes the out-of-fold probabilities
    mlp_hidden: int = Field(16, ge=2)  # hidden units when meta is "mlp"
    # On a larger train split, only the fewest whole folds holding this many rows are predicted (their fold models
    # are the ones the full K-fold trains; crossmodal.training.stacking); null: every fold, whatever the size.
    oof_rows: Annotated[int, Field(ge=1)] | None = 8192


class OgmGeConfig(_Section):
    """On-the-fly gradient modulation with generalisation enhancement (Peng et al., CVPR 2022)."""

    enabled: bool = False
    alpha: float = Field(0.5, gt=0)  # strength: coefficient 1 - tanh(alpha * (ratio - 1)) for the dominant modality
    gaussian_noise: bool = True  # the "GE" part: noise with the gradient's own std added to encoder gradients


class TraditionalConfig(_Section):
    """The scikit-learn baselines: TF-IDF text features, colour-histogram + HOG image features."""

    max_features: int = Field(20000, ge=10)  # TF-IDF vocabulary cap
    ngram_max: int = Field(2, ge=1, le=3)  # word n-grams 1..ngram_max
    image_size: int = Field(64, ge=16, le=512)  # images are resized (centre crop) to this square before HOG
    color_bins: int = Field(8, ge=2, le=64)  # per HSV channel
    hog_cell: int = Field(8, ge=4)  # pixels per HOG cell
    hog_orientations: int = Field(9, ge=4, le=36)
    c_grid: list[float] = Field(default_factory=lambda: [0.1, 1.0, 10.0])  # inverse regularisation, picked on val

    @field_validator("c_grid")
    @classmethod
    def _positive(cls, grid: list[float]) -> list[float]:
        if not grid or any(c <= 0 for c in grid):
            raise ValueError("c_grid needs at least one value, all > 0")
        return grid


class FinetuneConfig(_Section):
    """The fine-tuned cross-attention head (``crossmodal.training.finetune``): encoders' last layers + a fusion head.

    The defaults are a budget for a small CPU and the demo dataset; on a GPU raise ``max_train_rows``, ``epochs``
    and ``image_size``.
    """

    enabled: bool = True  # also needs finetune_xattn in train.heads; `--no-finetune` sets this to false
    image_blocks: int = Field(2, ge=0)  # last N blocks of the image CNN that are trained (0: frozen)
    text_layers: int = Field(2, ge=0)  # last N transformer layers of the text encoder that are trained
    epochs: int = Field(8, ge=1)
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)  # optimizer step every N batches (effective batch = batch_size * N)
    lr_encoder: float = Field(5e-5, gt=0)  # discriminative learning rates: small for pretrained layers ...
    lr_head: float = Field(1e-3, gt=0)  # ... larger for the freshly initialised fusion head
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)  # linear warm-up over this share of the steps ...
    decay: Literal["cosine", "linear"] = "cosine"  # ... then decay to zero
    max_train_rows: int | None = Field(2000, ge=1)  # budget: a stratified sample of the train split; null: all
    image_size: int = Field(96, ge=32, le=1024)  # smaller than the frozen encoder's 224: the CPU budget
    max_length: int = Field(32, ge=8, le=4096)  # text tokens
    model_dim: int = Field(128, ge=8)  # width of the cross-attention layers
    fusion_layers: int = Field(1, ge=1, le=8)  # bidirectional cross-attention layers
    attention_heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    resume: bool = True  # continue from a checkpoint of the same data and settings (a finished one is reused)
    checkpoint_dir: str | None = None  # default: <paths.cache>/finetune (without a cache: <out>/.finetune_checkpoints)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> FinetuneConfig:
        if self.model_dim % self.attention_heads:
            raise ValueError(f"model_dim {self.model_dim} must be a multiple of attention_heads "
                             f"{self.attention_heads}")
        return self


class TrainConfig(_Section):
    heads: list[str] = Field(default_factory=lambda: list(HEAD_NAMES))
    hidden_dim: int = Field(256, ge=8)
    dropout: float = Field(0.2, ge=0, lt=1)
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    batch_size: int = Field(64, ge=1)
    max_epochs: int = Field(60, ge=1)
    patience: int = Field(8, ge=1)  # early stopping on validation macro-F1
    class_weights: bool = True
    seed: int = 0
    loss: Literal["cross_entropy", "focal"] = "cross_entropy"
    focal_gamma: float = Field(2.0, ge=0)  # focal loss (1 - p_y)^gamma down-weights easy examples; 0 = cross-entropy
    aux_loss_weight: float = Field(0.0, ge=0)  # weight of the auxiliary unimodal losses of fusion heads; 0 = off
    ogm_ge: OgmGeConfig = OgmGeConfig()
    stacking: StackingConfig = StackingConfig()
    traditional: TraditionalConfig = TraditionalConfig()
    # Per training row and modality, the chance that it is hidden (set to missing) for that step, so heads
    # learn to predict from one modality; never both modalities of one row. 0 turns it off.
    modality_dropout: float = Field(0.0, ge=0, lt=1)
    # Processes that train the frozen-feature heads at once (this one included), one torch thread each; the
    # results are the same whatever the number. auto: one per CPU core (memory permitting) when the heads should
    # take longer than starting a worker does, else 1. See crossmodal.training.pool.
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    finetune: FinetuneConfig = FinetuneConfig()

    @field_validator("heads")
    @classmethod
    def _known_heads(cls, heads: list[str]) -> list[str]:
        unknown = [h for h in heads if h not in HEAD_NAMES]
        if unknown:
            raise ValueError(f"unknown head(s) {unknown}; choose from {list(HEAD_NAMES)}")
        if not heads:
            raise ValueError("train.heads is empty; name at least one head")
        if all(h in TRADITIONAL_HEADS for h in heads):
            raise ValueError(f"train.heads names only traditional baselines {heads}; add at least one deep head "
                             "(the baselines are compared, never registered)")
        return list(dict.fromkeys(heads))


class MlflowConfig(_Section):
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite under mlflow/
    artifact_root: str = "mlflow/artifacts"
    experiment: str = "crossmodal"
    model_name: str = "crossmodal-fusion"


class PromotionConfig(_Section):
    metric: Literal["macro_f1", "accuracy", "roc_auc"] = "macro_f1"
    min_improvement: float = Field(0.005, ge=0)  # challenger must beat champion by more than this
    lock_timeout_s: float = Field(1800, gt=0)  # how long a run waits for another run's gate to finish


class ServingConfig(_Section):
    """How the served model reads its input; stored in the logged model, so it travels with it."""

    # Folder whose files a request may name by path in the ``image`` column. None: paths are refused and images
    # must come as bytes (``image_bytes``, base64 over REST), so that no request can make the server read a file.
    allowed_image_root: str | None = None


class PathsConfig(_Section):
    work: str = "work"  # per-run outputs (validated table, trained heads)
    cache: str = ".cache/crossmodal"  # content-addressed feature cache shared by all runs
    reports: str = "reports"
    summary: str = "reports/summary.json"


class Config(_Section):
    data: DataConfig = DataConfig()
    demo: DemoConfig = DemoConfig()
    validation: ValidationConfig = ValidationConfig()
    encoders: EncodersConfig = EncodersConfig()
    train: TrainConfig = TrainConfig()
    mlflow: MlflowConfig = MlflowConfig()
    promotion: PromotionConfig = PromotionConfig()
    paths: PathsConfig = PathsConfig()
    serving: ServingConfig = ServingConfig()

    @model_validator(mode="after")
    def _distinct_columns(self) -> Config:
        cols = self.data.columns.model_dump()
        seen: dict[str, str] = {}
        for role, name in cols.items():
            if name in seen:
                raise ValueError(f"data.columns.{role} and data.columns.{seen[name]} both name column {name!r}")
            seen[name] = role
        return self


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {loc}: {msg}")
    return "\n".join(lines)


def from_dict(data: dict[str, Any] | None, source: str = "configuration") -> Config:
    try:
        return Config.model_validate(data or {})
    except ValidationError as err:
        raise ConfigError(_format_error(err, source)) from None


def load_config(path: str | Path | None = "params.yaml", overrides: dict[str, Any] | None = None) -> Config:
    """Read ``params.yaml`` (defaults when ``path`` is None or absent) and apply dotted overrides.

    ``overrides`` maps dotted keys to values, e.g. ``{"train.lr": 0.01}``.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None and Path(path).exists():
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, not {type(data).__name__}")
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {dotted}: {key} is not a section")
        node[leaf] = value
    return from_dict(data, source)
