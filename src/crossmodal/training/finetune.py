"""Fine-tuning end to end: the encoders' last layers and a bidirectional cross-attention fusion head, from raw inputs.

    from crossmodal.config import load_config
    from crossmodal.heads.xattn import load_finetuned
    from crossmodal.training.finetune import finetune_head
    cfg = load_config("params.yaml")
    info = finetune_head("work/validated/validated.parquet", cfg.train, cfg.encoders, "work/models",
                         cache_dir=cfg.paths.cache)              # writes work/models/finetune_xattn/; its head.json
    model, meta = load_finetuned("work/models/finetune_xattn")   # FinetunedXattn in eval mode, head.json

The model (``crossmodal.heads.xattn.FinetunedXattn``, settings ``train.finetune``) trains the image CNN's last
``image_blocks`` blocks and the text transformer's last ``text_layers`` layers under a cross-attention head, with
AdamW (a smaller learning rate for the pretrained layers), warm-up then decay, and bf16 autocast where the hardware
is fast at it; the epoch with the best validation macro-F1 is kept. The frozen layers' outputs never change, so
they are computed once per row, and only the tuned layers run each epoch. ``epochs``, ``max_train_rows`` and
``image_size`` may be ``auto``: :func:`resolve_budget` makes them numbers for the device (a CPU budget, or 224 px,
every row and more epochs on CUDA), before anything is fingerprinted.

Augmented views (``train.augment`` with ``views: K`` and ``finetune: true``): K views of each training image and
text (``crossmodal.data.augment``) also go through the frozen layers once, cached on disk by content, settings and
view (``crossmodal.training.finetune_views``), and each epoch every training row is seen as one of its K + 1
views (view 0: itself), drawn from a stream of its own, so batch order and modality dropout stay those of a run
without views. Validation and test rows are never augmented; the augmentation settings are part of the fingerprint.

Checkpoints: after every epoch, ``<root>/<fingerprint>/`` gets the trained tensors and optimizer state
(safetensors, no pickle) and the epoch, history and scheduler (JSON); ``<root>`` is ``train.finetune.checkpoint_dir``,
else ``<cache_dir>/finetune``, else ``<out_dir>/.finetune_checkpoints``. The fingerprint covers the data and every
setting that changes the result, so a run interrupted after epoch k resumes at epoch k+1, a finished checkpoint is
reused as is, and an unreadable one costs a retrain, never the run.

Writes ``<out_dir>/labels.json`` and ``<out_dir>/finetune_xattn/``: ``weights.safetensors`` (the trained layers and
the head; the frozen layers come from the pretrained encoders named in ``head.json``), ``head.json`` (modality
"fusion", family "finetuned") and ``predictions.npz`` (as every head, with the test rows also predicted without
text and without image).

Several processes: ``train.finetune.processes: N`` trains with DistributedDataParallel in N ranks
(``crossmodal.training.distributed``; gloo on CPU, NCCL with one GPU per rank). Every rank draws the same batch
order and modality-dropout masks and takes its slice of each batch; the loss of a slice is its share of the whole
batch's (class-weighted) mean, so the averaged gradient is that of the whole batch and the learning rates need no
scaling. Rank 0 validates, writes the checkpoints and the outputs; the caller's ``on_epoch_end`` runs in the
caller (with ``model`` None: the model lives in the ranks) while the ranks wait. A checkpoint of N processes is
not one of a single process (BatchNorm statistics and dropout see slices), so N > 1 is part of the fingerprint.
Every rank draws the same views; rank 0 fills the views' cache while the others wait, then they read it.
"""


from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from crossmodal.artifacts import HEAD_FILE, LABELS_FILE, PREDICTIONS_FILE
from crossmodal.config import EncodersConfig, FinetuneConfig, TrainConfig
from crossmodal.data.manifest import is_absent
from crossmodal.data.validated import read_validated
from crossmodal.errors import FinetuneError
from crossmodal.files import atomic_path, write_json
from crossmodal.hardware import autocast
from crossmodal.heads.xattn import NAME, FinetunedXattn, load_trained, save_finetuned
from crossmodal.heads.xattn_inputs import predict_proba, prepare_inputs
from crossmodal.training.distributed import RankContext, run_ranks
from crossmodal.training.finetune_views import train_views

log = logging.getLogger(__name__)


CHECKPOINT_VERSION = 1
BUDGET_KEYS = ("epochs", "max_train_rows", "image_size")  # the settings that may be ``auto`` (by hardware)
VIEW_STREAM = 7919  # offsets the seed of the per-epoch view draws from the batch order's (another stream)


def resolve_budget(ft: FinetuneConfig, device: torch.device) -> FinetuneConfig:
    """``ft`` with every ``auto`` of ``BUDGET_KEYS`` replaced by ``crossmodal.hardware.finetune_budget(device)``."""
    from crossmodal.hardware import finetune_budget

    budget = finetune_budget(device)
    auto = {k: budget[k] for k in BUDGET_KEYS if getattr(ft, k) == "auto"}
    return ft.model_copy(update=auto) if auto else ft


# ---------------------------------------------------------------------------------------------- training pieces
def lr_factor(step: int, total: int, warmup: int, decay: str) -> float:
    """Linear warm-up from ~0 to 1 over ``warmup`` steps, then cosine or linear decay to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if decay == "cosine" else 1.0 - progress


def modality_dropout_masks(n: int, rate: float, generator: torch.Generator, image_missing: torch.Tensor | None = None,
                           text_missing: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, drop the image and the text each with probability ``rate``; a row never loses both.

    ``image_missing`` / ``text_missing`` (bool, per row) mark modalities already absent: such a row never loses the
    other one, as in the frozen heads' ``crossmodal.training.loop.modality_dropout``.
    """
    drop = torch.rand(n, 2, generator=generator) < rate
    both = drop.all(1)
    keep_text = torch.rand(n, generator=generator) < 0.5
    drop[both, 0] = keep_text[both]  # of a row drawn for both, one modality (at random) is kept
    drop[both, 1] = ~keep_text[both]
    drop_image, drop_text = drop[:, 0], drop[:, 1]
    if text_missing is not None:
        drop_image = drop_image & ~text_missing
    if image_missing is not None:
        drop_text = drop_text & ~image_missing
    return drop_image, drop_text


def budget_rows(y: np.ndarray, max_rows: int | None, seed: int) -> np.ndarray:
    """Indices of at most ``max_rows`` training rows, stratified by class (every class keeps a row), sorted."""
    n = len(y)
    if max_rows is None or n <= max_rows:
        return np.arange(n)
    classes, counts = np.unique(y, return_counts=True)
    exact = max_rows * counts / n
    quota = np.minimum(np.maximum(1, np.floor(exact)).astype(np.int64), counts)
    for c in np.argsort(-(exact - np.floor(exact)), kind="stable"):  # largest remainders get the rows left over
        if quota.sum() >= max_rows:
            break
        quota[c] += quota[c] < counts[c]
    while quota.sum() > max_rows:  # the one-row minimum pushed it over: take from the largest class
        quota[np.argmax(quota)] -= 1
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(chosen))


def fingerprint(frame, labels: list[str], cfg: TrainConfig, encoders: EncodersConfig, precision: str) -> str:
    """What a checkpoint is valid for: the data (ids, labels, splits, image hashes, texts) and every setting used."""
    h = hashlib.sha256()
    settings = {"v": CHECKPOINT_VERSION, "finetune": cfg.finetune.model_dump(exclude={"resume", "checkpoint_dir",
                                                                                      "enabled", "processes"}),
                "seed": cfg.seed, "class_weights": cfg.class_weights, "modality_dropout": cfg.modality_dropout,
                "image": encoders.image.name, "text": encoders.text.name, "precision": precision, "labels": labels}
    if cfg.finetune.processes > 1:  # only then: the checkpoints of one process keep their fingerprint
        settings["processes"] = cfg.finetune.processes
    if cfg.augment.for_finetune:  # likewise: without views, a checkpoint keeps the fingerprint it had before them
        settings["augment"] = cfg.augment.model_dump(mode="json", exclude={"finetune", "frozen"})
    h.update(json.dumps(settings, sort_keys=True).encode())
    for col in ("id", "label", "split", "image_sha256", "text"):
        values = frame[col] if col in frame.columns else [""] * len(frame)
        for v in values:
            b = ("" if is_absent(v) else str(v)).encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little") + b)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(directory: Path, model: FinetunedXattn, optimizer, scheduler, state: dict,
                    best: dict[str, torch.Tensor]) -> None:
    """Tensors to safetensors (no pickle anywhere), everything else to JSON; checkpoint.json is written last."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in model.trained_state().items()}
    tensors.update({f"best.{k}": v.detach().cpu().contiguous().clone() for k, v in best.items()})
    opt = optimizer.state_dict()
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in opt["state"].items():
        for key, value in pstate.items():
            if torch.is_tensor(value) and value.ndim > 0:
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous().clone()
            else:  # AdamW's step counter: a 0-d tensor or a number
                scalars.setdefault(str(pid), {})[key] = float(value)
    with atomic_path(directory / "tensors.safetensors") as tmp:  # the epoch tags the pair (tensors, json)
        save_file(tensors, str(tmp), metadata={"epoch": str(state["epoch"])})
    meta = {**state, "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
            "scheduler": scheduler.state_dict()}
    write_json(directory / "checkpoint.json", meta)


def load_checkpoint(directory: Path, model: FinetunedXattn, optimizer, scheduler) -> tuple[dict, dict]:
    """Restore model, optimizer and scheduler from ``directory``; returns (state json, best weights)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    meta = json.loads((directory / "checkpoint.json").read_text())
    with safe_open(str(directory / "tensors.safetensors"), "pt") as fh:
        tagged = (fh.metadata() or {}).get("epoch")
    if tagged != str(meta["epoch"]):  # interrupted between the two writes: the pair does not belong together
        raise FinetuneError(f"{directory}: tensors of epoch {tagged} but checkpoint.json of epoch {meta['epoch']}")
    tensors = load_file(str(directory / "tensors.safetensors"))
    trained = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    load_trained(model, trained, directory / "tensors.safetensors")
    best = {k[len("best."):]: v for k, v in tensors.items() if k.startswith("best.")}
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta["optimizer"]["scalars"].items():
        for name, value in values.items():
            state.setdefault(int(pid), {})[name] = torch.tensor(value)
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return meta, best


# ---------------------------------------------------------------------------------------------- the trainer
def _read_table(validated_path: Path):
    return read_validated(validated_path, ("id", "image", "text", "label", "split"), FinetuneError)


def _plan(validated_path: Path, cfg: TrainConfig, encoders: EncodersConfig, out_dir: Path, cache_dir,
          device: torch.device | None = None) -> dict[str, Any]:
    """The table, its labels and splits (checked), the device and precision, and the checkpoint folder."""
    from crossmodal.hardware import precision_name, resolve_device, resolve_precision

    df = _read_table(validated_path)
    labels = sorted(df["label"].astype(str).unique())
    if len(labels) < 2:
        raise FinetuneError(f"{validated_path} has {len(labels)} label(s); a classifier needs at least 2")
    y_all = df["label"].astype(str).map({lab: i for i, lab in enumerate(labels)}).to_numpy(np.int64)
    split = df["split"].astype(str).to_numpy()
    for s in ("train", "val"):
        if not (split == s).any():
            raise FinetuneError(f"the {s} split of {validated_path} has no rows; fine-tuning needs train and val rows")

    device = device or resolve_device(encoders.device)
    dtype = resolve_precision(encoders.precision, device)
    cfg = cfg.model_copy(update={"finetune": resolve_budget(cfg.finetune, device)})  # what "auto" is here
    ft = cfg.finetune
    key = fingerprint(df, labels, cfg, encoders, precision_name(dtype))
    root = Path(ft.checkpoint_dir) if ft.checkpoint_dir else (
        Path(cache_dir) / "finetune" if cache_dir else out_dir / ".finetune_checkpoints")
    return {"df": df, "labels": labels, "y_all": y_all, "split": split, "device": device, "dtype": dtype,
            "key": key, "ckpt_dir": root / key[:24], "cfg": cfg}


def finetune_head(validated_path, cfg: TrainConfig, encoders: EncodersConfig, out_dir, *, cache_dir=None,
                  max_pixels: int | None = None, on_epoch_end=None) -> dict[str, Any]:
    """Fine-tune ``finetune_xattn`` on ``validated.parquet``; write ``<out_dir>/finetune_xattn/``; return head.json.

    ``on_epoch_end(epoch, history_row, model)`` is called after each epoch's checkpoint is on disk (progress
    reports; an exception raised there interrupts training like a crash would, and the next call resumes). With
    ``train.finetune.processes`` > 1 it is called here while the ranks wait, with ``model`` None.
    """
    if cfg.finetune.processes == 1:
        return _finetune(validated_path, cfg, encoders, out_dir, cache_dir, max_pixels, on_epoch_end)
    plan = _plan(Path(validated_path), cfg, encoders, Path(out_dir), cache_dir)
    if cfg.finetune.resume and _finished(plan["ckpt_dir"], plan["cfg"].finetune.epochs):
        # Nothing left to train: predicting from the checkpoint here costs less than starting the ranks.
        return _finetune(validated_path, cfg, encoders, out_dir, cache_dir, max_pixels, on_epoch_end)
    return _launch(validated_path, cfg, encoders, out_dir, cache_dir, max_pixels, on_epoch_end)


def finetune_rank(payload: dict[str, Any], rank: RankContext) -> None:
    """One rank of a fine-tuning run with ``train.finetune.processes`` > 1 (started by :func:`finetune_head`)."""
    _finetune(payload["validated_path"], TrainConfig.model_validate(payload["cfg"]),
              EncodersConfig.model_validate(payload["encoders"]), payload["out_dir"], payload["cache_dir"],
              payload["max_pixels"], None, rank)


def _finished(ckpt_dir: Path, epochs: int) -> bool:
    try:
        return json.loads((ckpt_dir / "checkpoint.json").read_text())["epoch"] >= epochs
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _launch(validated_path, cfg: TrainConfig, encoders: EncodersConfig, out_dir, cache_dir, max_pixels,
            on_epoch_end) -> dict[str, Any]:
    from crossmodal.hardware import resolve_device

    n = cfg.finetune.processes
    device = resolve_device(encoders.device)
    if os.name == "nt":
        raise FinetuneError(f"train.finetune.processes is {n}, but several processes need Linux or macOS; set it to 1")
    if device.type == "mps":
        raise FinetuneError(f"train.finetune.processes is {n}, but DistributedDataParallel does not run on Apple "
                            "MPS; set train.finetune.processes: 1, or encoders.device: cpu")
    if device.type == "cuda" and torch.cuda.device_count() < n:
        raise FinetuneError(f"train.finetune.processes is {n}, but torch sees {torch.cuda.device_count()} CUDA "
                            "GPU(s) and each process needs its own; lower it, or set encoders.device: cpu")

    def report(message: dict) -> None:
        if on_epoch_end is not None:
            on_epoch_end(message["epoch"], message["row"], None)

    log.info("%s: training in %d processes (%s)", NAME, n, "NCCL" if device.type == "cuda" else "gloo")
    payload = {"validated_path": str(validated_path), "cfg": cfg.model_dump(mode="json"),
               "encoders": encoders.model_dump(mode="json"), "out_dir": str(out_dir),
               "cache_dir": None if cache_dir is None else str(cache_dir), "max_pixels": max_pixels}
    run_ranks(f"{__name__}:finetune_rank", payload, n, cuda=device.type == "cuda", on_report=report,
              error=FinetuneError, what=NAME)
    return json.loads((Path(out_dir) / NAME / HEAD_FILE).read_text())


def _share_of_loss(logits: torch.Tensor, rows: torch.Tensor, share: int, batch: torch.Tensor,
                   weight: torch.Tensor | None) -> torch.Tensor:
    """This rank's part of the whole batch's (class-weighted) mean cross-entropy: the parts sum to it.

    ``rows``' targets (``share`` of them count; 0: a stand-in row run at weight 0), ``batch``: the whole batch's.
    """
    per_row = nn.functional.cross_entropy(logits.float(), rows, weight=weight, reduction="none")
    if share == 0:
        per_row = per_row * 0
    return per_row.sum() / (weight[batch].sum() if weight is not None else len(batch))


def _finetune(validated_path, cfg: TrainConfig, encoders: EncodersConfig, out_dir, cache_dir, max_pixels,
              on_epoch_end, rank: RankContext | None = None) -> dict[str, Any] | None:
    """The training itself, in one process (``rank`` None) or as one rank; returns head.json (None in rank > 0)."""
    from crossmodal.data.images import ImageError
    from crossmodal.evaluation.metrics import compute_metrics
    from crossmodal.hardware import precision_name, usable_cores
    from crossmodal.training.loop import balanced_class_weights, is_better, macro_f1, torch_threads

    world = rank.world_size if rank is not None else 1
    main = rank is None or rank.is_main
    validated_path, out_dir = Path(validated_path), Path(out_dir)
    plan = _plan(validated_path, cfg, encoders, out_dir, cache_dir, rank.device if rank is not None else None)
    cfg = plan["cfg"]  # with the budget resolved for this device
    ft = cfg.finetune
    df, labels, y_all, split = plan["df"], plan["labels"], plan["y_all"], plan["split"]
    device, dtype, key, ckpt_dir = plan["device"], plan["dtype"], plan["key"], plan["ckpt_dir"]

    torch.manual_seed(cfg.seed)  # the head's initialisation
    from crossmodal.encoders.registry import load_image_encoder, load_text_encoder

    image_enc, text_enc = load_image_encoder(encoders.image.name, "cpu"), load_text_encoder(encoders.text.name, "cpu")
    model = FinetunedXattn(image_enc, text_enc, len(labels), ft).to(device)

    t0 = time.perf_counter()
    train_idx = np.flatnonzero(split == "train")
    train_idx = train_idx[budget_rows(y_all[train_idx], ft.max_train_rows, cfg.seed)]
    rows = {"train": train_idx, "val": np.flatnonzero(split == "val"), "test": np.flatnonzero(split == "test")}
    prepared = rows if main else {"train": train_idx}  # only rank 0 validates and predicts
    try:
        inputs = {s: prepare_inputs(df["image"].iloc[r].tolist(), df["text"].iloc[r].tolist(), text_enc.tokenizer,
                                    ft.image_size, min(ft.max_length, text_enc.max_positions), max_pixels,
                                    [f"row id {i!r}" for i in df["id"].iloc[r]])
                  for s, r in prepared.items()}
    except ImageError as err:  # validation decoded it, so the file changed or vanished since
        raise FinetuneError(f"{validated_path}: {err}; re-run `crossmodal validate` to quarantine it") from None
    y = {s: torch.from_numpy(y_all[r]) for s, r in rows.items()}
    inputs = {s: model.cache_frozen(x, ft.batch_size * 2, dtype) for s, x in inputs.items()}
    prep_seconds = time.perf_counter() - t0

    weight = torch.from_numpy(balanced_class_weights(y_all[train_idx], len(labels))) if cfg.class_weights else None
    criterion = nn.CrossEntropyLoss(weight=None if weight is None else weight.to(device))
    encoder_params = [p for m in model.tuned_modules() for p in m.parameters()]
    optimizer = torch.optim.AdamW(
        [{"params": encoder_params, "lr": ft.lr_encoder}, {"params": list(model.head.parameters()), "lr": ft.lr_head}],
        weight_decay=ft.weight_decay)
    batches = math.ceil(len(train_idx) / ft.batch_size)
    steps_per_epoch = math.ceil(batches / ft.grad_accum)
    total = steps_per_epoch * ft.epochs
    warmup = int(round(ft.warmup_fraction * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup, ft.decay))

    history: list[dict] = []
    best_f1, best_loss, best_ep, best_state = -1.0, float("inf"), 0, model.trained_state()
    start_epoch, resumed_from, meta, failed = 1, None, None, None
    if ft.resume and (ckpt_dir / "checkpoint.json").is_file():
        try:
            meta, best_state = load_checkpoint(ckpt_dir, model, optimizer, scheduler)
        except Exception as err:  # an unreadable or foreign checkpoint costs a retrain, never the run
            failed = err
    if rank is not None and rank.all_sum([failed is not None])[0] and failed is None:
        failed = FinetuneError("another rank could not read it")  # every rank restarts, or none
    if failed is not None:
        log.warning("ignoring checkpoint %s (%s); training from the start", ckpt_dir, failed)
        return _restart(validated_path, cfg, encoders, out_dir, ckpt_dir, cache_dir, max_pixels, on_epoch_end, rank)
    if meta is not None:
        history, best_ep = meta["history"], meta["best_epoch"]
        best_f1, best_loss = meta["best_val_macro_f1"], meta["best_val_loss"]
        start_epoch = resumed_from = meta["epoch"] + 1
        log.info("%s: resuming from %s after epoch %d of %d", NAME, ckpt_dir, meta["epoch"], ft.epochs)
    if rank is None and ft.processes > 1 and start_epoch <= ft.epochs:
        # finetune_head found this checkpoint finished and it is not now: the epochs left are the ranks' to train
        return _launch(validated_path, cfg, encoders, out_dir, cache_dir, max_pixels, on_epoch_end)

    # Rank 0 predicts while the other ranks wait at a barrier (or have exited), so it may use their cores.
    all_cores = ((lambda: torch_threads(usable_cores())) if rank is not None and device.type == "cpu"
                 else nullcontext)
    n = len(train_idx)
    pool, views, views_seconds = inputs["train"], 0, 0.0
    if cfg.augment.for_finetune and start_epoch <= ft.epochs:  # a finished checkpoint needs no views
        v0 = time.perf_counter()
        views = cfg.augment.views
        if "image_sha256" not in df.columns:
            raise FinetuneError(f"{validated_path} lacks column 'image_sha256', which names the images' augmented "
                                "views; re-run `crossmodal validate`")
        if rank is not None and not rank.is_main:
            rank.barrier()  # rank 0 fills the views' cache first; the others then read it
        try:
            with all_cores() if main else nullcontext():
                pool = train_views(model, df["image"].iloc[train_idx].tolist(), df["text"].iloc[train_idx].tolist(),
                                   df["image_sha256"].iloc[train_idx].tolist(),
                                   [f"row id {i!r}" for i in df["id"].iloc[train_idx]], inputs["train"], ft,
                                   cfg.augment, ckpt_dir.parent, dtype, max_pixels)
        except ImageError as err:
            raise FinetuneError(f"{validated_path}: {err}; re-run `crossmodal validate` to quarantine it") from None
        if rank is not None and rank.is_main:
            rank.barrier()
        views_seconds = time.perf_counter() - v0
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    for epoch in range(start_epoch, ft.epochs + 1):
        e0 = time.perf_counter()
        net.train()
        # Per-epoch seeds: batch order, modality dropout and dropout replay identically after a resume. Every
        # rank draws the same order and masks from ``gen``; dropout inside the model differs by rank, as it would
        # between the rows of one process's batch.
        gen = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch)
        torch.manual_seed(cfg.seed * 100_003 + epoch + (rank.rank << 32 if rank is not None else 0))
        drop_image, drop_text = modality_dropout_masks(n, cfg.modality_dropout, gen, inputs["train"].image_missing,
                                                       inputs["train"].text_missing)
        total_loss, seen = 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        order = torch.randperm(n, generator=gen).split(ft.batch_size)
        # Which view each row is seen as this epoch (0: itself), from a stream of its own: batch order and
        # dropout masks are those of a run without views. Every rank draws the same.
        at = torch.arange(n)
        if views:
            pick = torch.Generator().manual_seed(cfg.seed * 100_003 + epoch + VIEW_STREAM)
            at = torch.randint(0, views + 1, (n,), generator=pick) * n + at
        for b, idx in enumerate(order):
            stepping = (b + 1) % ft.grad_accum == 0 or b + 1 == len(order)
            share = idx if world == 1 else idx.tensor_split(world)[rank.rank]
            # A rank whose slice of a short last batch is empty still runs a row at weight 0: DDP reduces the
            # gradients of every rank at every step.
            part = share if len(share) else idx[:1]
            batch = pool.batch(at[part], device)
            batch["image_missing"] |= drop_image[part].to(device)
            batch["text_missing"] |= drop_text[part].to(device)
            with nullcontext() if stepping or world == 1 else net.no_sync():  # reduce once per optimizer step
                with autocast(device, dtype):
                    logits = net(**batch)
                if world == 1:
                    loss = criterion(logits.float(), y["train"][idx].to(device))
                else:
                    loss = _share_of_loss(logits, y["train"][part].to(device), len(share),
                                          y["train"][idx].to(device), criterion.weight)
                # mean over the accumulated rows; DDP averages over the ranks, so each part counts ``world`` times
                (loss * (world * len(idx)) / (ft.batch_size * ft.grad_accum)).backward()
            total_loss += loss.item() * len(idx)
            seen += len(share)
            if stepping:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        if rank is not None:
            total_loss, seen = rank.all_sum([total_loss, seen])
        if not math.isfinite(total_loss):
            raise FinetuneError(f"{NAME}: training loss became {total_loss} at epoch {epoch}; lower "
                                f"train.finetune.lr_head ({ft.lr_head}) and lr_encoder ({ft.lr_encoder})")
        if main:
            with all_cores():
                val_proba = predict_proba(model, inputs["val"], ft.batch_size * 2, dtype)
            val_loss = float(nn.functional.nll_loss(torch.log(torch.from_numpy(val_proba).clamp(min=1e-12)),
                                                    y["val"], weight=weight))
            val_f1 = macro_f1(y["val"].numpy(), val_proba.argmax(1))
            lrs = scheduler.get_last_lr()
            history.append({"epoch": epoch, "train_loss": total_loss / max(seen, 1), "val_loss": val_loss,
                            "val_macro_f1": val_f1, "lr_encoder": lrs[0], "lr_head": lrs[1],
                            "seconds": round(time.perf_counter() - e0, 3)})
            if is_better(val_f1, val_loss, best_f1, best_loss):
                best_f1, best_loss, best_ep = val_f1, val_loss, epoch
                best_state = {k: v.detach().cpu().clone() for k, v in model.trained_state().items()}
            save_checkpoint(ckpt_dir, model, optimizer, scheduler,
                            {"epoch": epoch, "epochs": ft.epochs, "history": history, "best_epoch": best_ep,
                             "best_val_macro_f1": best_f1, "best_val_loss": best_loss, "fingerprint": key},
                            best_state)
            log.info("%s epoch %d/%d: train loss %.4f, val loss %.4f, val macro-F1 %.3f (%.1f s)", NAME, epoch,
                     ft.epochs, history[-1]["train_loss"], val_loss, val_f1, history[-1]["seconds"])
            if on_epoch_end is not None:
                on_epoch_end(epoch, history[-1], model)
            if rank is not None:
                rank.report({"epoch": epoch, "row": history[-1]})
        if rank is not None:
            rank.barrier()  # the others wait for rank 0's validation, checkpoint and caller
    if not main:
        return None

    load_trained(model, {k: v.to(device) for k, v in best_state.items()}, ckpt_dir / "tensors.safetensors")
    with all_cores():
        proba = {s: predict_proba(model, inputs[s], ft.batch_size * 2, dtype) for s in ("val", "test")}
        missing = {m: predict_proba(model, inputs["test"], ft.batch_size * 2, dtype, drop=m)
                   for m in ("text", "image")}
    info = {
        "family": "finetuned",
        "best_epoch": best_ep,
        "epochs_run": len(history),
        "resumed_from_epoch": resumed_from,
        "train_seconds": round(time.perf_counter() - t0, 3),
        "prepare_seconds": round(prep_seconds, 3),
        "views_seconds": round(views_seconds, 3),  # the training rows' augmented views (0 when off or reused)
        "train_rows_used": int(len(train_idx)),
        "train_rows_available": int((split == "train").sum()),
        "val_metrics": compute_metrics(y["val"].numpy(), proba["val"], labels),
        "history": history,
        "labels": labels,
        "device": str(device),
        "precision": precision_name(dtype),
        "processes": ft.processes,
        "tuned": {"image_units": model.image.tuned, "image_units_total": len(model.image.units),
                  "text_layers": model.text.tuned, "text_layer_path": model.text.layer_path},
        "checkpoint": str(ckpt_dir),
        "config": cfg.finetune.model_dump(),
        "augment": cfg.augment.model_dump(mode="json") if cfg.augment.for_finetune else None,
    }
    head_dir = save_finetuned(model, out_dir / NAME, info)
    (out_dir / LABELS_FILE).write_text(json.dumps(labels, indent=2))  # as train_all writes it: class = position
    ids = {s: df["id"].iloc[r].to_numpy().astype(str) for s, r in rows.items()}  # unicode, not object: no pickle
    np.savez(head_dir / PREDICTIONS_FILE,
             **{f"{s}_proba": proba[s] for s in ("val", "test")},
             **{f"{s}_y": y[s].numpy() for s in ("val", "test")},
             **{f"{s}_ids": ids[s] for s in ("val", "test")},
             test_proba_missing_text=missing["text"], test_proba_missing_image=missing["image"])
    return json.loads((head_dir / HEAD_FILE).read_text())


def _restart(validated_path, cfg, encoders, out_dir, ckpt_dir, cache_dir, max_pixels, on_epoch_end, rank):
    import shutil

    if rank is None or rank.is_main:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    if rank is None:
        return finetune_head(validated_path, cfg, encoders, out_dir, cache_dir=cache_dir, max_pixels=max_pixels,
                             on_epoch_end=on_epoch_end)
    rank.barrier()  # removed before any rank looks for it again
    return _finetune(validated_path, cfg, encoders, out_dir, cache_dir, max_pixels, on_epoch_end, rank)
