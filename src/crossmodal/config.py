"""Typed configuration: every knob of the pipeline, read from ``params.yaml``.

    from crossmodal.config import load_config
    cfg = load_config("params.yaml", {"train.lr": 0.01})   # defaults where the file or a key is absent
    cfg.train.lr, cfg.encoders.image.name

The CLI, the Prefect flows and ``dvc.yaml`` all read the same file through :func:`load_config`, so a value means
the same thing wherever it is used. Unknown keys are rejected (``extra="forbid"``): a typo in ``params.yaml`` is a
ConfigError that names the key, not a setting silently ignored.

``--set`` on the command line goes through the same models, and every value can say where it came from::

    from crossmodal.config import load_config_with_sources, parse_set
    overrides = parse_set(["train.max_epochs=30", "train.heads=[concat,gated]"])   # values read as YAML
    cfg, sources = load_config_with_sources("params.yaml", overrides, {k: "--set" for k in overrides})
    sources["train.max_epochs"], sources["train.lr"]      # "--set", "params.yaml" (or "default")
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from crossmodal.errors import ConfigError

HEAD_NAMES = ("image_only", "text_only", "concat", "gated", "add", "late", "attention", "stacking", "cnn_rnn",
              "linear_probe", "ensemble", "finetune_xattn", "traditional_text", "traditional_image", "traditional_concat")
FINETUNED_HEADS = ("finetune_xattn",)  # trained end to end from raw inputs (crossmodal.training.finetune), not on features
UNIMODAL_HEADS = ("image_only", "text_only")
# A text RNN on word pieces + an MLP on the frozen image features, fused at the output (crossmodal.training.cnn_rnn).
RNN_HEADS = ("cnn_rnn",)
# Baselines fitted with scikit-learn on handcrafted features (crossmodal.training.traditional): compared, never registered.
TRADITIONAL_HEADS = ("traditional_text", "traditional_image", "traditional_concat")
# Trained after the other heads, from their validation probabilities (crossmodal.training.ensemble).
ENSEMBLE_HEADS = ("ensemble",)
# Trained by the shared loop (crossmodal.training.loop.train_head): the heads train.head_params can set, and tune.
# Listed, not derived: a head with a trainer of its own (stacking, linear_probe, ...) takes none of these settings.
LOOP_HEADS = ("image_only", "text_only", "concat", "gated", "add", "late", "attention")


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


def _positive_grid(cls, grid: list[float]) -> list[float]:
    """The check of a logistic regression's ``c_grid`` (the traditional baselines', linear_probe's)."""
    if not grid or any(c <= 0 for c in grid):
        raise ValueError("c_grid needs at least one value, all > 0")
    return grid


class TraditionalConfig(_Section):
    """The scikit-learn baselines: TF-IDF text features; colour histograms + HOG or a SIFT bag of visual words for
    images; optionally both projected (PCA / LDA / CCA) before they are fused (crossmodal.training.traditional)."""

    max_features: int = Field(20000, ge=10)  # TF-IDF vocabulary cap
    ngram_max: int = Field(2, ge=1, le=3)  # word n-grams 1..ngram_max
    image_size: int = Field(64, ge=16, le=512)  # images are resized (centre crop) to this square before HOG / SIFT
    image_features: Literal["hog_color", "sift_bovw"] = "hog_color"  # handcrafted image descriptor
    color_bins: int = Field(8, ge=2, le=64)  # per HSV channel
    hog_cell: int = Field(8, ge=4)  # pixels per HOG cell
    hog_orientations: int = Field(9, ge=4, le=36)
    sift_step: int = Field(8, ge=2)  # dense SIFT: pixels between grid keypoints, each describing a 2*step patch
    sift_vocabulary: int = Field(256, ge=8, le=4096)  # visual words (k-means on train descriptors)
    sift_max_descriptors: int = Field(100_000, ge=1000)  # k-means sees at most this many train descriptors (seeded)
    sift_weighting: Literal["l1", "hellinger"] = "hellinger"  # word histograms: L1-normalised, or their square roots
    # Shared space before fusing: none | pca (per modality) | lda (per modality, <= classes - 1 dims) | cca
    # (image and text blocks correlated with each other; the unimodal baselines stay unprojected).
    projection: Literal["none", "pca", "lda", "cca"] = "none"
    projection_dim: int = Field(64, ge=1)  # dims per modality after the projection (lda: at most classes - 1)
    svd_dim: int = Field(256, ge=2)  # blocks wider than this are reduced first (TF-IDF: TruncatedSVD; images: PCA)
    c_grid: list[float] = Field(default_factory=lambda: [0.1, 1.0, 10.0])  # inverse regularisation, picked on val

    _positive = field_validator("c_grid")(_positive_grid)

    @model_validator(mode="after")
    def _fits_the_image(self) -> TraditionalConfig:
        if self.image_features == "hog_color" and 2 * self.hog_cell > self.image_size:
            raise ValueError(f"hog_cell {self.hog_cell} leaves fewer than 2x2 HOG cells in image_size "
                             f"{self.image_size}; lower hog_cell or raise image_size")
        if self.image_features == "sift_bovw" and 2 * self.sift_step > self.image_size:
            raise ValueError(f"sift_step {self.sift_step} makes 2*step = {2 * self.sift_step}-pixel SIFT patches, "
                             f"larger than image_size {self.image_size}; lower sift_step or raise image_size")
        if self.projection in ("pca", "cca") and self.projection_dim > self.svd_dim:
            raise ValueError(f"projection_dim {self.projection_dim} exceeds svd_dim {self.svd_dim}: the blocks are "
                             f"reduced to svd_dim before projection {self.projection!r}; raise svd_dim or lower "
                             "projection_dim")
        return self


class LinearProbeConfig(_Section):
    """``linear_probe``: a logistic regression on the standardised, concatenated frozen features."""

    c_grid: list[float] = Field(default_factory=lambda: [0.01, 0.1, 1.0])  # inverse regularisation, picked on val
    max_iter: int = Field(300, ge=10)

    _positive = field_validator("c_grid")(_positive_grid)


class EnsembleConfig(_Section):
    """``ensemble``: which trained heads it averages, chosen on their validation probabilities
    (``crossmodal.training.ensemble``)."""

    # within_se: every head whose temperature-scaled validation log-loss is within `width` standard errors of
    # the best head's, equal weights; greedy: selection with replacement (Caruana et al. 2004)
    selection: Literal["within_se", "greedy"] = "within_se"
    width: float = Field(2.0, gt=0, le=10)  # within_se: standard errors of the paired, grouped difference
    rounds: int = Field(30, ge=1, le=1000)  # greedy: members picked (with replacement); a head's weight = its share
    metric: Literal["log_loss", "macro_f1"] = "log_loss"  # greedy: what each pick improves on validation
    # all: the frozen-feature heads and the run's cnn_rnn and finetune_xattn (served beside them; the fine-tuned
    # head brings its own encoders); frozen: the frozen-feature heads only, served on one pair of encoders
    pool: Literal["all", "frozen"] = "all"


class CnnRnnConfig(_Section):
    """``cnn_rnn``: model-level fusion of an RNN text model and the image CNN's features (``crossmodal.heads.cnn_rnn``).

    Optimizer, weight decay, loss, class weights and seed are the ``train`` section's.
    """

    fusion: Literal["weighted_sum", "mlp"] = "weighted_sum"  # learned weights per class over the logits, or an MLP
    rnn: Literal["gru", "lstm"] = "gru"
    hidden: int = Field(64, ge=4, le=4096)  # RNN units per direction; also the width of the image and fusion MLPs
    max_length: int = Field(32, ge=1, le=4096)  # word pieces of a text that the RNN reads (the rest is cut)
    epochs: int = Field(30, ge=1)  # at most; early stopping on validation macro-F1
    patience: int = Field(5, ge=1)
    lr: float = Field(2e-3, gt=0)
    dropout: float = Field(0.2, ge=0, lt=1)
    batch_size: int = Field(64, ge=1)
    branch_loss_weight: float = Field(1.0, ge=0)  # each branch's own cross-entropy, so either can decide alone


class FinetuneConfig(_Section):
    """The fine-tuned cross-attention head (``crossmodal.training.finetune``): encoders' last layers + a fusion head.

    ``epochs``, ``max_train_rows`` and ``image_size`` are ``auto`` by default: a budget for a small CPU, and more
    when ``encoders.device`` resolves to a CUDA GPU (``crossmodal.hardware.finetune_budget``); a number (or ``null``
    rows: all) is used as given on any device.
    """

    enabled: bool = True  # also needs finetune_xattn in train.heads; `--no-finetune` sets this to false
    image_blocks: int = Field(2, ge=0)  # last N blocks of the image CNN that are trained (0: frozen)
    text_layers: int = Field(2, ge=0)  # last N transformer layers of the text encoder that are trained
    epochs: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"
    batch_size: int = Field(32, ge=1)
    grad_accum: int = Field(1, ge=1)  # optimizer step every N batches (effective batch = batch_size * N)
    # Discriminative learning rates: smaller for the pretrained layers, larger for the freshly initialised head
    # (docs/heads.md#what-limits-fine-tuning: 5e-5 / 1e-3 tied on the demo and traded val for test on the icons).
    lr_encoder: float = Field(2e-4, gt=0)
    lr_head: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)  # linear warm-up over this share of the steps ...
    decay: Literal["cosine", "linear"] = "cosine"  # ... then decay to zero
    # budget: a stratified sample of the train split; null: all
    max_train_rows: Annotated[int, Field(ge=1)] | Literal["auto"] | None = "auto"
    image_size: Annotated[int, Field(ge=32, le=1024)] | Literal["auto"] = "auto"  # auto: small on a CPU, 224 on CUDA
    max_length: int = Field(32, ge=8, le=4096)  # text tokens
    model_dim: int = Field(128, ge=8)  # width of the cross-attention layers
    fusion_layers: int = Field(1, ge=1, le=8)  # bidirectional cross-attention layers
    attention_heads: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0, lt=1)
    resume: bool = True  # continue from a checkpoint of the same data and settings (a finished one is reused)
    checkpoint_dir: str | None = None  # default: <paths.cache>/finetune (without a cache: <out>/.finetune_checkpoints)
    # N processes with DistributedDataParallel (gloo on CPU, NCCL on CUDA with one process per GPU), each taking
    # 1/N of every batch; the effective batch stays batch_size * grad_accum, so the learning rates stay as they are.
    processes: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> FinetuneConfig:
        if self.model_dim % self.attention_heads:
            raise ValueError(f"model_dim {self.model_dim} must be a multiple of attention_heads "
                             f"{self.attention_heads}")
        return self


class HeadParams(_Section):
    """One head's own training settings (``train.head_params.<head>``, e.g. written by ``crossmodal tune``); a key
    left out keeps the value of the train section. Same bounds as there."""

    hidden_dim: int | None = Field(None, ge=8)
    dropout: float | None = Field(None, ge=0, lt=1)
    lr: float | None = Field(None, gt=0)
    weight_decay: float | None = Field(None, ge=0)
    batch_size: int | None = Field(None, ge=1)
    modality_dropout: float | None = Field(None, ge=0, lt=1)
    patience: int | None = Field(None, ge=1)


class ImageAugmentConfig(_Section):
    """How an augmented view of an image is drawn (``crossmodal.data.augment``)."""

    # RandomResizedCrop: a crop of this share of the image's area (aspect 3:4 to 4:3), resized to the input size
    crop_scale: tuple[float, float] = (0.7, 1.0)
    flip: bool = True  # mirrored left to right with chance 1/2
    # brightness, contrast and saturation each scaled by a factor drawn from [1 - j, 1 + j]; hue is left alone
    color_jitter: float = Field(0.2, ge=0, lt=1)

    @field_validator("crop_scale")
    @classmethod
    def _scale_range(cls, scale: tuple[float, float]) -> tuple[float, float]:
        low, high = scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"crop_scale must be [low, high] with 0 < low <= high <= 1, got {list(scale)}")
        return scale


class TextAugmentConfig(_Section):
    """How an augmented view of a text is drawn (``crossmodal.data.augment``); rates are per word.

    Off by default: text views cost fine-tuning 29 macro-F1 points on the demo and 5 on the oxygen icons, where image
    views gained 1.5 and 6 (docs/training.md#what-the-views-buy). A caption's few decisive words are what they drop.
    """

    token_dropout: float = Field(0.0, ge=0, lt=1)  # a word replaced by the tokenizer's unknown token ([UNK])
    deletion: float = Field(0.0, ge=0, lt=1)  # a word deleted (one original word always stays)
    swap: float = Field(0.0, ge=0, le=1)  # a word swapped with the next one


class AugmentConfig(_Section):
    """Augmented views of the training rows (``crossmodal.data.augment``): K per training image and text, computed
    once and cached by content, settings and view; each epoch a row is seen as one of its views or as itself (view 0).
    Validation and test rows are never augmented."""

    views: int = Field(0, ge=0, le=32)  # K augmented views per training row; 0: off
    image: ImageAugmentConfig = ImageAugmentConfig()
    text: TextAugmentConfig = TextAugmentConfig()
    finetune: bool = True  # finetune_xattn trains on the views
    frozen: bool = False  # the frozen-feature heads train on the views' features (encoded into the feature store)
    seed: int = 0  # of the views: view k of a row is the same in every run with the same settings

    @property
    def for_finetune(self) -> bool:
        return self.views > 0 and self.finetune

    @property
    def for_frozen(self) -> bool:
        return self.views > 0 and self.frozen


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
    finetune: FinetuneConfig = FinetuneConfig()
    cnn_rnn: CnnRnnConfig = CnnRnnConfig()
    augment: AugmentConfig = AugmentConfig()
    # Seed bagging of the frozen-feature heads: each trained from seeds seed..seed+K-1, probabilities averaged.
    seeds: int = Field(1, ge=1, le=32)
    linear_probe: LinearProbeConfig = LinearProbeConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    # Per-head overrides of the settings above, by head name ({concat: {lr: 0.003, hidden_dim: 128}}): see for_head.
    head_params: dict[str, HeadParams] = Field(default_factory=dict)

    def for_head(self, name: str) -> TrainConfig:
        """These settings as head ``name`` trains with them: its ``head_params`` applied (``self`` when it has none)."""
        own = self.head_params.get(name)
        if own is None:
            return self
        return self.model_copy(update=own.model_dump(exclude_none=True))

    @field_validator("head_params")
    @classmethod
    def _loop_heads_only(cls, params: dict[str, HeadParams]) -> dict[str, HeadParams]:
        unknown = [h for h in params if h not in LOOP_HEADS]
        if unknown:
            raise ValueError(f"no per-head settings for {unknown}: they apply to the heads the training loop trains, "
                             f"{list(LOOP_HEADS)} (stacking's base models are image_only and text_only)")
        return params

    @model_validator(mode="after")
    def _stacking_bases_agree(self) -> TrainConfig:
        # Stacking's head holds one image_only and one text_only of a single hidden size (heads.stacking), trained
        # with those heads' own settings: sizes that differ could not be loaded into it.
        sizes = {h: self.for_head(h).hidden_dim for h in UNIMODAL_HEADS}
        if "stacking" in self.heads and len(set(sizes.values())) > 1:
            raise ValueError(f"stacking uses image_only and text_only as its base models, so their hidden_dim must "
                             f"agree (now {sizes}); set train.head_params.image_only.hidden_dim and "
                             "train.head_params.text_only.hidden_dim to one value")
        return self

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
    """The champion/challenger gate (crossmodal.registry.promotion): a paired bootstrap interval of the
    challenger-minus-champion difference of ``metric`` on test rows neither model learned from."""

    metric: Literal["macro_f1", "accuracy", "roc_auc"] = "macro_f1"
    # The interval's low end must be above this (0: any improvement the interval shows); a fraction, 0.01 = 1 point.
    min_improvement: float = Field(0.0, ge=0, le=1)
    # Fewer rows unseen by both models and the gate refuses: below ~100 rows a percentile bootstrap undercovers, and
    # the interval of an accuracy difference is about +-2*sqrt(d/n) wide (d: share of rows the two disagree on),
    # +-6 points at n=100, d=10 %: wider than most real gains, so a promotion there would mostly be luck.
    min_rows: int = Field(100, ge=1)
    # With 2000 resamples the Monte Carlo error of a 95 % interval's ends is about 6 % of the delta's standard error
    # (the usual 1000-2000 for percentile intervals); 100 still leaves a few resamples in each tail (fast tests).
    bootstrap_resamples: int = Field(2000, ge=100, le=1_000_000)
    confidence: float = Field(0.95, ge=0.5, lt=1)  # of the interval
    seed: int = Field(0, ge=0)  # of the bootstrap: the same rows and models give the same interval
    lock_timeout_s: float = Field(1800, gt=0)  # how long a run waits for another run's gate to finish


class ServingConfig(_Section):
    """How the served model reads its input; stored in the logged model, so it travels with it."""

    # Folder whose files a request may name by path in the ``image`` column. None: paths are refused and images
    # must come as bytes (``image_bytes``, base64 over REST), so that no request can make the server read a file.
    allowed_image_root: str | None = None


class DriftConfig(_Section):
    """Drift tests of ``crossmodal predict`` (``crossmodal.evaluation.drift``) against the model's drift reference."""

    # Three tests (image, text, labels) run on every batch: at 0.01 a batch that has not drifted raises a false
    # alarm at most ~3% of the time (15% at 0.05), and 500 permutations still resolve p-values well below it.
    alpha: float = Field(0.01, gt=0, lt=0.5)
    permutations: int = Field(500, ge=19, le=100_000)  # permutation / Monte Carlo draws per test
    reference_rows: int = Field(2000, ge=10)  # training rows sampled into the reference at publish time
    max_rows: int = Field(1000, ge=10)  # rows per side a test compares (seeded subsample): bounds time and memory
    seed: int = 0

    @model_validator(mode="after")
    def _resolvable(self) -> DriftConfig:
        # A permutation p-value is never below 1 / (permutations + 1): fewer draws could never flag anything.
        if 1 / (self.permutations + 1) > self.alpha:
            raise ValueError(f"permutations={self.permutations} is too few for alpha={self.alpha}: the smallest "
                             f"p-value is 1/(permutations+1); use at least {int(1 / self.alpha)}")
        return self


class PathsConfig(_Section):
    work: str = "work"  # per-run outputs (validated table, trained heads)
    cache: str = ".cache/crossmodal"  # content-addressed feature cache shared by all runs
    reports: str = "reports"
    summary: str = "reports/summary.json"


class OrchestrationConfig(_Section):
    """Where the flow's tasks run (``flows.execution``): every stage, extraction shard and head is a Prefect task.

    ``auto``: on the Dask cluster at ``dask_address`` when one is given (here, ``crossmodal run --dask-address`` or
    ``$CROSSMODAL_DASK_ADDRESS``), else a Dask ``LocalCluster`` of one single-threaded worker process per core
    (``workers``) where there is more than one core, else threads. ``threads``: Prefect's thread pool in this
    process; ``processes``: Prefect's process pool; ``dask``: prefect-dask's DaskTaskRunner (a LocalCluster
    without an address).
    """

    task_runner: Literal["auto", "threads", "processes", "dask"] = "auto"
    dask_address: str | None = None  # tcp://HOST:PORT of a running Dask scheduler
    workers: Annotated[int, Field(ge=1)] | Literal["auto"] = "auto"  # local pools and LocalCluster; auto: one per core
    # Distinct images (or texts) per extraction task; a multiple of the store's 512-item chunks keeps the features the
    # same to the bit as one task's (texts are encoded in batches of similar length within a chunk).
    shard_items: int = Field(512, ge=1)
    # Dask only: extraction shards and the fine-tuned head ask for one unit of the worker resource GPU (start GPU
    # workers with `dask worker ... --resources GPU=1`); a cluster without such workers would never run them.
    gpu_tasks: bool = False

    @field_validator("dask_address")
    @classmethod
    def _scheme(cls, address: str | None) -> str | None:
        if address is not None and "://" not in address:
            raise ValueError(f"{address!r} is not a scheduler address; write it as tcp://HOST:PORT")
        return address


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
    drift: DriftConfig = DriftConfig()
    orchestration: OrchestrationConfig = OrchestrationConfig()

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
    data, source = _read_params(path)
    return from_dict(_apply_overrides(data, overrides), source)


def _read_params(path: str | Path | None) -> tuple[dict[str, Any], str]:
    """The mapping in ``path`` and the name of where it came from ("defaults" when there is no file)."""
    if path is None or not Path(path).exists():
        return {}, "defaults"
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections, not {type(data).__name__}")
    return data, str(path)


def _apply_overrides(data: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"cannot set {dotted}: {key} is not a section")
        node[leaf] = value
    return data


# ----------------------------------------------------------------------------- --set and where values come from
SET_SOURCE = "--set"
DEFAULT_SOURCE = "default"


def _section_model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


@cache
def _settings() -> dict[str, tuple[Any, bool]]:
    """Every dotted key of :class:`Config`, in declaration order: (its field, whether it is a section)."""
    out: dict[str, tuple[Any, bool]] = {}

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, field in model.model_fields.items():
            sub = _section_model(field.annotation)
            out[prefix + name] = (field, sub is not None)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")

    walk(Config, "")
    return out


def setting_keys() -> list[str]:
    """The dotted key of every setting (sections left out), in the order of ``params.yaml``'s models."""
    return [key for key, (_, section) in _settings().items() if not section]


def format_value(value: Any) -> str:
    """A value as ``--set`` and ``params.yaml`` write it (YAML flow style): ``3``, ``null``, ``[concat, gated]``."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1_000_000, allow_unicode=True).strip()
    return text.removesuffix("...").strip()  # a bare scalar's document end marker


def _accepts_str(annotation: Any) -> bool:
    return annotation is str or (get_origin(annotation) in (Union, UnionType) and str in get_args(annotation))


def _unknown(item: str, key: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(_settings()), n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]}?)" if close else "; `crossmodal config show` lists every setting"
    return ConfigError(f"--set {item}: unknown setting {key}{hint}")


def _in_mapping(key: str) -> bool:
    """Whether ``key`` points inside a setting that is a mapping (``train.head_params.concat.lr``): its keys are
    checked when the config is loaded, as the file's are."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        found = _settings().get(".".join(parts[:end]))
        if found is not None:
            field, section = found
            return not section and get_origin(field.annotation) is dict
    return False


def _set_leaves(item: str, key: str, value: Any, raw: str | None) -> dict[str, Any]:
    found = _settings().get(key)
    if found is None:
        if _in_mapping(key):
            return {key: value}
        raise _unknown(item, key)
    field, section = found
    if section:
        if not isinstance(value, dict):
            first = next(k for k in setting_keys() if k.startswith(key + "."))
            raise ConfigError(f"--set {item}: {key} is a section, not a setting; set one of its keys "
                              f"(e.g. --set {first}=...) or give it a mapping ({key}={{...}})")
        out: dict[str, Any] = {}
        for sub, sub_value in value.items():
            out.update(_set_leaves(item, f"{key}.{sub}", sub_value, None))
        return out
    # YAML reads 2024 as a number and yes as true; a text setting (a model name, a column) means the text itself.
    if _accepts_str(field.annotation) and isinstance(value, int | float) and not isinstance(value, bool):
        value = raw if raw is not None else str(value)
    elif _accepts_str(field.annotation) and isinstance(value, bool) and raw is not None:
        value = raw
    return {key: value}


def parse_set(items: Iterable[str] | None) -> dict[str, Any]:
    """``--set`` items as dotted overrides: ``["train.max_epochs=30", "train.heads=[concat,gated]"]`` ->
    ``{"train.max_epochs": 30, "train.heads": ["concat", "gated"]}``.

    Each value is read as YAML (``null``, ``[a, b]``, ``{epochs: 2}``; an empty value is null); a mapping given for
    a section sets its keys one by one, the section's other keys keep their values. A later item wins. The keys
    are checked here (a ConfigError naming the item, with the closest known key), the values when the config is
    loaded (:func:`load_config_with_sources`).
    """
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. --set train.max_epochs=30")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"--set {item}: the value is not valid YAML ({problem}); quote it, e.g. "
                              f"--set '{key}=\"...\"'") from None
        out.update(_set_leaves(item, key, value, text.strip()))
    return out


def _culprits(loc: str, msg: str, overrides: dict[str, Any]) -> list[str]:
    """The override keys an error at ``loc`` comes from: the key itself (or a section above it), else for a
    section-wide check (a model validator) the overrides inside that section (at the top level: those it names)."""
    exact = [k for k in overrides if loc == k or loc.startswith(k + ".")]
    if exact:
        return exact
    return [k for k in overrides if (k.startswith(loc + ".") if loc else k in msg)]


def _describe_override(key: str, value: Any, source: str | None) -> str:
    if source == SET_SOURCE:
        return f"--set {key}={format_value(value)}"
    return f"{source or 'override'} ({key}={format_value(value)})"


def _explain(err: ValidationError, source: str, overrides: dict[str, Any], sources: dict[str, str]) -> str:
    """One line per bad override (``--set train.max_epochs=0: Input should be ...``), then what the file got wrong."""
    by_override: dict[str, list[str]] = {}
    rest = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        keys = _culprits(loc, msg, overrides)
        for key in keys:
            msgs = by_override.setdefault(key, [])
            if msg not in msgs:
                msgs.append(msg)
        if not keys:
            rest.append(f"  {loc or '(top level)'}: {msg}")
    lines = [f"{_describe_override(k, overrides[k], sources.get(k))}: {'; '.join(m)}" for k, m in by_override.items()]
    if rest:
        lines += [f"invalid configuration in {source}:", *rest]
    return "\n".join(lines)


def _leaf_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    keys: set[str] = set()
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys |= _leaf_keys(value, dotted + ".") if isinstance(value, dict) and value else {dotted}
    return keys


def load_config_with_sources(path: str | Path | None = "params.yaml", overrides: dict[str, Any] | None = None,
                             option_sources: dict[str, str] | None = None) -> tuple[Config, dict[str, str]]:
    """:func:`load_config`, and where each setting's value came from: ``{dotted key: source}`` for every key of
    :func:`setting_keys`, the source being ``"default"``, the params file's path as given, or the override's entry
    in ``option_sources`` (``"--set"``, ``"option --epochs"``; ``"override"`` when it has none).

    A bad override value is a ConfigError of one line naming it (``--set train.max_epochs=0: Input should be
    greater than or equal to 1``).
    """
    overrides = dict(overrides or {})
    sources = dict(option_sources or {})
    data, source = _read_params(path)
    in_file = _leaf_keys(data)
    try:
        cfg = Config.model_validate(_apply_overrides(data, overrides))
    except ValidationError as err:
        raise ConfigError(_explain(err, source, overrides, sources)) from None
    origin = {}
    for key in setting_keys():
        # k below key: a key inside a mapping setting (train.head_params.concat.lr), and so are the file's keys
        by = next((k for k in overrides if key == k or key.startswith(k + ".") or k.startswith(key + ".")), None)
        in_this_file = key in in_file or any(k.startswith(key + ".") for k in in_file)
        origin[key] = (sources.get(by, "override") if by is not None
                       else source if in_this_file else DEFAULT_SOURCE)
    return cfg, origin
