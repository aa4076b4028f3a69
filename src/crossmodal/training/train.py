"""The train stage: every head in ``train.heads`` trained and written under one folder.

    from crossmodal.config import load_config
    from crossmodal.training.train import train_all
    cfg = load_config("params.yaml")
    result = train_all("work/validated/validated.parquet", "work/features/image.npy", "work/features/text.npy",
                       cfg.train, "work/models", cfg.encoders, cache_dir=cfg.paths.cache)    # a TrainResult

What lands under ``out_dir`` is listed in ``crossmodal.artifacts`` (``labels.json``, then per head ``head.json``,
``weights.safetensors`` and ``predictions.npz``; the traditional baselines write no weights); a head folder left
by an earlier run that this one does not train is removed. The frozen-feature heads (stacking's folds too) train
first, as independent tasks on ``train.workers`` processes (``crossmodal.training.frozen``); then the fine-tuned
head, from raw inputs (``crossmodal.training.finetune``); then the baselines (``crossmodal.training.traditional``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from crossmodal.artifacts import HEAD_FILE, LABELS_FILE
from crossmodal.config import EncodersConfig, TrainConfig
from crossmodal.data.split import SPLITS
from crossmodal.training.dataset import load_split_features
from crossmodal.training.progress import epoch_writer


@dataclass
class TrainResult:
    """What train_all did; every per-head dict is keyed by head name."""

    out_dir: str
    labels: list[str]
    heads: list[str]
    rows: dict[str, int]  # per split
    head_dirs: dict[str, str] = field(default_factory=dict)
    val_macro_f1: dict[str, float] = field(default_factory=dict)
    best_epoch: dict[str, int] = field(default_factory=dict)
    epochs_run: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    workers: int = 1  # processes that trained the frozen-feature heads at once (train.workers)

    def to_dict(self) -> dict:
        return asdict(self)


def train_all(validated_path, image_features_path, text_features_path, cfg: TrainConfig, out_dir,
              encoders: EncodersConfig | None = None, cache_dir=None, progress_dir=None) -> TrainResult:
    """Train every head in ``cfg.heads`` and write their weights, metadata and predictions under ``out_dir``.

    The fine-tuned head (``finetune_xattn``, when ``cfg.finetune.enabled``) trains last, from the raw images and
    texts of ``validated_path`` with the encoders named in ``encoders`` (defaults when None); its checkpoints go
    under ``cache_dir`` (see ``crossmodal.training.finetune``). With ``progress_dir`` every head appends its
    epochs there while it trains (``crossmodal.training.progress``), for whoever shows or logs them live.
    """
    import shutil

    from crossmodal.config import FINETUNED_HEADS, HEAD_NAMES, TRADITIONAL_HEADS
    from crossmodal.training.frozen import train_frozen_heads

    data, labels = load_split_features(validated_path, image_features_path, text_features_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / LABELS_FILE).write_text(json.dumps(labels, indent=2))
    # Fine-tuned heads last (the slowest), and only when enabled.
    heads = [h for h in cfg.heads if h not in FINETUNED_HEADS]
    heads += [h for h in cfg.heads if h in FINETUNED_HEADS and cfg.finetune.enabled]
    # A head trained by an earlier run but not by this one would otherwise be evaluated as if current.
    for stale_name in HEAD_NAMES:
        if stale_name not in heads and (out_dir / stale_name / HEAD_FILE).is_file():
            shutil.rmtree(out_dir / stale_name)

    rows = {s: int(len(data.y[s])) for s in SPLITS}
    result = TrainResult(out_dir=str(out_dir), labels=labels, heads=heads, rows=rows)
    frozen = [h for h in heads if h not in TRADITIONAL_HEADS and h not in FINETUNED_HEADS]
    if frozen:  # on every core at once where it pays (train.workers): see crossmodal.training.frozen
        summaries, result.workers = train_frozen_heads(
            frozen, data, labels, cfg, out_dir, (validated_path, image_features_path, text_features_path),
            None if progress_dir is None else str(progress_dir))
        for name, summary in summaries.items():
            result.head_dirs[name] = summary["dir"]
            result.val_macro_f1[name] = summary["val_macro_f1"]
            result.best_epoch[name], result.epochs_run[name] = summary["best_epoch"], summary["epochs_run"]
            result.seconds[name] = summary["seconds"]
    for name in heads:
        if name in FINETUNED_HEADS:
            from crossmodal.training.finetune import finetune_head

            write = epoch_writer(progress_dir, name)
            info = finetune_head(validated_path, cfg, encoders or EncodersConfig(), out_dir, cache_dir=cache_dir,
                                 on_epoch_end=None if write is None else lambda epoch, row, model, w=write: w(row))
            result.head_dirs[name] = str(out_dir / name)
            result.val_macro_f1[name] = info["val_metrics"]["macro_f1"]
            result.best_epoch[name], result.epochs_run[name] = info["best_epoch"], info["epochs_run"]
            result.seconds[name] = info["train_seconds"]
    traditional = [h for h in cfg.heads if h in TRADITIONAL_HEADS]
    if traditional:
        from crossmodal.training.traditional import train_traditional

        for name, info in train_traditional(validated_path, data, labels, cfg, out_dir, traditional).items():
            result.head_dirs[name] = str(out_dir / name)
            result.val_macro_f1[name] = info["val_metrics"]["macro_f1"]
            result.best_epoch[name] = info["best_epoch"]
            result.epochs_run[name] = info["epochs_run"]
            result.seconds[name] = info["train_seconds"]
    return result
