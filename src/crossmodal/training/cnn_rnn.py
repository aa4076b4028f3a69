"""Training the ``cnn_rnn`` head (``crossmodal.heads.cnn_rnn``): word pieces of the texts + the frozen image features.

    from crossmodal.training.cnn_rnn import save_cnn_rnn, train_cnn_rnn
    data, labels = load_split_features("validated.parquet", "image.npy", "text.npy")
    trained = train_cnn_rnn("validated.parquet", data, cfg.train, cfg.encoders, len(labels))
    summary = save_cnn_rnn(trained, data, labels, cfg.train, "work/models")   # writes work/models/cnn_rnn/

The validated table's texts are tokenised once per task with the text encoder's tokenizer (offline, from its
package); the image branch reads the run's image features (``data.image``), so no image is decoded again. The loop
is the shared one's (``crossmodal.training.loop``) in small: seeded batches (``BatchStream``), ``train.optimizer``,
``train.loss`` with ``train.class_weights``, validation after every epoch, early stopping on validation macro-F1
after ``train.cnn_rnn.patience`` epochs without a gain, the best epoch's weights kept. The loss is the fused
cross-entropy plus ``train.cnn_rnn.branch_loss_weight`` x each branch's own, so that a row with one modality is
decided well by the branch it has. On one thread, as every training task (``loop.torch_threads``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from crossmodal.artifacts import PREDICTIONS_FILE
from crossmodal.config import EncodersConfig, TrainConfig
from crossmodal.data.split import SPLITS
from crossmodal.data.validated import read_validated
from crossmodal.errors import TrainError
from crossmodal.files import atomic_dir
from crossmodal.training.dataset import SplitFeatures
from crossmodal.training.loop import (
    TRAIN_THREADS,
    VAL_BATCH,
    BatchStream,
    EarlyStopping,
    balanced_class_weights,
    best_epoch,
    macro_f1,
    make_optimizer,
    torch_threads,
)

FAMILY = "rnn"


@dataclass
class TrainedCnnRnn:
    """A trained head (eval mode), its per-epoch history, the token ids and masks per split, and the seconds."""

    head: object  # crossmodal.heads.cnn_rnn.CnnRnnHead
    history: list[dict]
    tokens: dict[str, tuple] = field(repr=False)  # split -> (input_ids, attention_mask), rows as in data
    seconds: float = 0.0


def split_tokens(validated_path, data: SplitFeatures, tokenizer, max_length: int) -> dict[str, tuple]:
    """The validated table's texts tokenised per split, in the rows' order in ``data``; TrainError if the table
    and the features disagree on the rows (they are read from the same file, so only a rewrite between them)."""
    from crossmodal.heads.cnn_rnn import tokenize

    df = read_validated(validated_path, ("id", "text", "split"), TrainError)
    split = df["split"].astype(str)
    out = {}
    for s in SPLITS:
        rows = df[split == s]
        if data.ids and not np.array_equal(rows["id"].astype(str).to_numpy(), data.ids[s]):
            raise TrainError(f"{validated_path}: the {s} rows differ from those of the features; run `crossmodal "
                             "extract` and `crossmodal train` again")
        out[s] = tokenize(tokenizer, rows["text"].tolist(), max_length)
    return out


def train_cnn_rnn(validated_path, data: SplitFeatures, cfg: TrainConfig, encoders: EncodersConfig,
                  num_classes: int, on_epoch: Callable[[dict], None] | None = None) -> TrainedCnnRnn:
    """Train the head on the train split, early-stopped on val; ``on_epoch`` gets each epoch's record."""
    start = time.perf_counter()
    with torch_threads(TRAIN_THREADS):
        trained = _train(validated_path, data, cfg, encoders, num_classes, on_epoch)
    trained.seconds = time.perf_counter() - start
    return trained


def _train(validated_path, data, cfg: TrainConfig, encoders: EncodersConfig, num_classes: int, on_epoch):
    import torch

    from crossmodal.encoders.registry import load_text_encoder
    from crossmodal.heads.cnn_rnn import CnnRnnHead
    from crossmodal.heads.registry import fit_standardizers
    from crossmodal.training.losses import make_criterion

    rc = cfg.cnn_rnn
    for split in ("train", "val"):
        if len(data.y[split]) == 0:
            raise TrainError(f"the {split} split has no rows; training needs train rows and val rows (early stopping)")
    encoder = load_text_encoder(encoders.text.name, "cpu")
    tokens = split_tokens(validated_path, data, encoder.tokenizer, rc.max_length)

    torch.manual_seed(cfg.seed)
    head = CnnRnnHead.from_encoder(encoder, data.image_dim, num_classes, fusion=rc.fusion, rnn=rc.rnn,
                                   hidden=rc.hidden, dropout=rc.dropout, max_length=rc.max_length)
    del encoder  # its table is in the head; the transformer itself is not needed
    fit_standardizers(head, data.image["train"], data.text["train"], statistics=data.statistics)

    xi = torch.from_numpy(np.ascontiguousarray(data.image["train"], dtype=np.float32))
    ids, mask = tokens["train"]
    y = torch.from_numpy(np.ascontiguousarray(data.y["train"], dtype=np.int64))
    vi = torch.from_numpy(np.ascontiguousarray(data.image["val"], dtype=np.float32))
    vids, vmask = tokens["val"]
    vy = torch.from_numpy(np.ascontiguousarray(data.y["val"], dtype=np.int64))
    weight = torch.from_numpy(balanced_class_weights(data.y["train"], num_classes)) if cfg.class_weights else None
    criterion = make_criterion(cfg, weight)
    optimizer = make_optimizer(cfg.optimizer, head.parameters(), rc.lr, cfg.weight_decay)
    batches = BatchStream(len(y), rc.batch_size, torch.Generator().manual_seed(cfg.seed))

    history: list[dict] = []
    stopping = EarlyStopping(rc.patience)
    for epoch in range(1, rc.epochs + 1):
        head.train()
        total, seen = 0.0, 0
        for idx in batches.epoch():
            optimizer.zero_grad(set_to_none=True)
            loss = head.loss(xi[idx], ids[idx], mask[idx], y[idx], criterion, rc.branch_loss_weight)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        head.eval()
        with torch.no_grad():
            val_logits = torch.cat([head(vi[i : i + VAL_BATCH], vids[i : i + VAL_BATCH], vmask[i : i + VAL_BATCH])
                                    for i in range(0, len(vy), VAL_BATCH)])
            val_loss = float(criterion(val_logits, vy))
        val_f1 = macro_f1(data.y["val"], val_logits.argmax(1).numpy())
        history.append({"epoch": epoch, "train_loss": total / max(seen, 1), "val_loss": val_loss,
                        "val_macro_f1": val_f1})
        if on_epoch is not None:
            on_epoch(history[-1])
        if not np.isfinite(total):
            raise TrainError(f"head cnn_rnn: training loss became {total} at epoch {epoch}; lower train.cnn_rnn.lr "
                             f"(now {rc.lr})")
        if stopping.update(val_f1, val_loss, head):  # the shared loop's rule
            break
    head.load_state_dict(stopping.best_state)
    return TrainedCnnRnn(head.eval(), history, tokens)


def save_cnn_rnn(trained: TrainedCnnRnn, data: SplitFeatures, labels: list[str], cfg: TrainConfig, out_dir) -> dict:
    """Predict val and test (and test without text, without image), write ``<out_dir>/cnn_rnn/`` whole: weights,
    head.json (family "rnn") and predictions.npz with the keys every head's has; returns the head's summary."""
    import torch

    from crossmodal.evaluation.metrics import compute_metrics
    from crossmodal.heads.cnn_rnn import predict_proba
    from crossmodal.heads.files import save_head
    from crossmodal.heads.inference import without

    head, tokens = trained.head, trained.tokens
    name = head.init_args["name"]
    with torch_threads(TRAIN_THREADS):
        proba = {s: predict_proba(head, data.image[s], *tokens[s]) for s in ("val", "test")}
        ids, mask = tokens["test"]
        robustness = {"test_proba_missing_text": predict_proba(head, data.image["test"], ids, torch.zeros_like(mask)),
                      "test_proba_missing_image": predict_proba(head, without(data.image["test"]), ids, mask)}
    val_metrics = compute_metrics(data.y["val"], proba["val"], labels)
    info = {"best_epoch": best_epoch(trained.history), "epochs_run": len(trained.history),
            "train_seconds": round(trained.seconds, 3), "val_metrics": val_metrics, "history": trained.history,
            "labels": labels, "config": cfg.model_dump(), "family": FAMILY}
    with atomic_dir(Path(out_dir) / name) as tmp:
        save_head(head, tmp, info)
        np.savez(tmp / PREDICTIONS_FILE,
                 **{f"{s}_proba": proba[s] for s in ("val", "test")},
                 **{f"{s}_y": data.y[s] for s in ("val", "test")},
                 **{f"{s}_ids": data.ids[s].astype(str) for s in ("val", "test")},
                 **robustness)
    return {"head": name, "dir": str(Path(out_dir) / name), "val_macro_f1": val_metrics["macro_f1"],
            "best_epoch": info["best_epoch"], "epochs_run": info["epochs_run"], "seconds": round(trained.seconds, 3)}
