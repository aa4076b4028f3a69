"""Model-level fusion of a CNN image model and an RNN text model: each branch classifies, their outputs are fused.

The image branch is the image CNN's pooled features (the run's frozen image features) -> standardised -> a small
MLP -> image logits. The text branch reads the text encoder's word pieces: their vectors from the encoder's own
word-embedding table -> a bidirectional GRU (or LSTM) -> mean and max over the real tokens -> a linear layer ->
text logits. The two are fused at the output:

* ``weighted_sum``: per class, softmax weights over the two branches (learned), fused = w_image * image logits +
  w_text * text logits;
* ``mlp``: an MLP over the two branches' concatenated logits.

A row without image (an all-NaN feature row) or without text (no token: its attention mask is all zero) drops that
branch: the other one decides alone (with neither, both branches' bias-only outputs are fused, so the output stays
defined). Each branch is also trained on its own loss (``crossmodal.training.cnn_rnn``), so that either can decide.

The word-embedding table is frozen and not saved: it is reloaded from the text encoder (offline, from its package)
when the head is loaded, and checked against the SHA-256 recorded at training (``init_args``). Frozen because every
token the encoder knows keeps its pretrained vector, including those that no training text contains: on the icon
names a trained table of only the training texts' pieces did worse (figures in docs/heads.md). The saved weights
are the RNN, the MLPs and the fusion (about 1 MB).

Usage::

    from crossmodal.encoders.registry import load_text_encoder
    from crossmodal.heads.cnn_rnn import CnnRnnHead, load_cnn_rnn, predict_proba, tokenize
    enc = load_text_encoder("all-MiniLM-L6-v2", "cpu")
    head = CnnRnnHead.from_encoder(enc, image_dim=1280, num_classes=3, fusion="weighted_sum")
    ids, mask = tokenize(enc.tokenizer, ["a red bus", None], max_length=32)   # None: no text
    proba = predict_proba(head, image_features, ids, mask)                     # (N, C) float32
    head = load_cnn_rnn("work/models/cnn_rnn", enc)                            # a saved one, eval mode
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from crossmodal.artifacts import HEAD_FILE, WEIGHTS_FILE
from crossmodal.errors import TrainError
from crossmodal.heads.common import Standardize, mlp

if TYPE_CHECKING:
    from crossmodal.encoders.text import TextEncoder

NAME = "cnn_rnn"
FUSIONS = ("weighted_sum", "mlp")
RNNS = ("gru", "lstm")


def embedding_table(encoder: TextEncoder) -> torch.Tensor:
    """The encoder's word-embedding table (vocabulary x dim) as float32 on the CPU, detached."""
    return encoder.model.get_input_embeddings().weight.detach().float().cpu().contiguous()


def table_digest(table: torch.Tensor) -> str:
    """SHA-256 of the table's float32 bytes: the same weights give the same digest on every machine."""
    return hashlib.sha256(table.float().contiguous().numpy().tobytes()).hexdigest()


class CnnRnnHead(nn.Module):
    """Image MLP + text RNN, fused at the output; ``forward(image, input_ids, attention_mask) -> logits``."""

    modality = "fusion"
    decides_missing_alone = True  # a one-modality row is decided by that branch alone

    def __init__(self, image_dim: int, embeddings: torch.Tensor, num_classes: int, *, text_encoder: str,
                 fusion: str = "weighted_sum", rnn: str = "gru", hidden: int = 64, dropout: float = 0.2,
                 max_length: int = 32, embeddings_sha256: str | None = None):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"unknown fusion {fusion!r}; set train.cnn_rnn.fusion to one of {list(FUSIONS)}")
        if rnn not in RNNS:
            raise ValueError(f"unknown rnn {rnn!r}; set train.cnn_rnn.rnn to one of {list(RNNS)}")
        if num_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got num_classes={num_classes}")
        vocab_size, text_dim = embeddings.shape
        digest = table_digest(embeddings)
        if embeddings_sha256 is not None and digest != embeddings_sha256:
            raise TrainError(f"the word embeddings of text encoder {text_encoder!r} differ from those this {NAME} "
                             "head was trained with (another version of the encoder?); retrain it with "
                             "`crossmodal train`")
        self.init_args: dict[str, Any] = {
            "name": NAME, "image_dim": int(image_dim), "text_dim": int(text_dim), "num_classes": int(num_classes),
            "text_encoder": text_encoder, "vocab_size": int(vocab_size), "fusion": fusion, "rnn": rnn,
            "hidden": int(hidden), "dropout": float(dropout), "max_length": int(max_length),
            "embeddings_sha256": digest}
        # Not persistent: the table comes from the text encoder when the head is built (see the module docstring).
        # Scaled to unit standard deviation: MiniLM's entries have one of about 0.06, so the RNN's default
        # initialisation would see inputs some 15 times smaller than it is made for, and learn slowly.
        table = embeddings.float().cpu()
        self.register_buffer("word_embeddings", (table / table.std().clamp(min=1e-12)).contiguous(), persistent=False)
        self.image_norm = Standardize(image_dim)
        self.image_classifier = mlp(image_dim, hidden, num_classes, dropout)
        self.dropout = nn.Dropout(dropout)
        self.rnn = (nn.GRU if rnn == "gru" else nn.LSTM)(text_dim, hidden, batch_first=True, bidirectional=True)
        self.text_classifier = nn.Linear(4 * hidden, num_classes)  # [mean, max] of 2 directions
        if fusion == "weighted_sum":
            self.fusion_weight = nn.Parameter(torch.zeros(2, num_classes))  # softmax over [image, text] per class
        else:
            self.fusion_mlp = mlp(2 * num_classes, hidden, num_classes, dropout)

    @classmethod
    def from_encoder(cls, encoder: TextEncoder, image_dim: int, num_classes: int, **settings) -> CnnRnnHead:
        """A new head on ``encoder``'s word embeddings; ``settings``: fusion, rnn, hidden, dropout, max_length."""
        return cls(image_dim, embedding_table(encoder), num_classes, text_encoder=encoder.name, **settings)

    # ------------------------------------------------------------------ branches
    def image_logits(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C), present (N,) bool); an absent image reads as the training mean (then dropped)."""
        present = ~torch.isnan(image).all(dim=1)
        z = torch.nan_to_num(self.image_norm(image), nan=0.0)
        return self.image_classifier(z), present

    def text_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, C), present (N,) bool); padding is neither read by the RNN nor pooled."""
        lengths = attention_mask.sum(1)
        present = lengths > 0
        width = max(1, int(lengths.max())) if len(lengths) else 1  # padding shared by the whole batch is cut
        ids, mask = input_ids[:, :width], attention_mask[:, :width].bool()
        x = self.dropout(nn.functional.embedding(ids, self.word_embeddings))
        # Packed: each direction runs over a row's real tokens only, so the backward pass does not start in padding.
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.clamp(min=1).cpu(), batch_first=True,
                                                   enforce_sorted=False)
        out, _ = self.rnn(packed)
        out, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=width)
        m = mask.unsqueeze(-1)
        mean = (out * m).sum(1) / m.sum(1).clamp(min=1)
        top = out.masked_fill(~m, float("-inf")).max(1).values
        pooled = torch.where(present[:, None], torch.cat([mean, top], dim=1), torch.zeros(()))  # no text: zeros
        return self.text_classifier(self.dropout(pooled)), present

    def branches(self, image, input_ids, attention_mask):
        """Both branches: (image logits, text logits, image present, text present)."""
        li, has_image = self.image_logits(image)
        lt, has_text = self.text_logits(input_ids, attention_mask)
        return li, lt, has_image, has_text

    # ------------------------------------------------------------------ fusion
    def fuse(self, li: torch.Tensor, lt: torch.Tensor, has_image: torch.Tensor, has_text: torch.Tensor) -> torch.Tensor:
        # With neither modality, both stay in (bias-only outputs): the result is defined, never NaN.
        use_image, use_text = has_image | ~has_text, has_text | ~has_image
        if self.init_args["fusion"] == "weighted_sum":
            w = self.fusion_weight.unsqueeze(0).expand(len(li), -1, -1)  # (N, 2, C)
            keep = torch.stack([use_image, use_text], dim=1).unsqueeze(-1)
            w = torch.softmax(w.masked_fill(~keep, float("-inf")), dim=1)
            return w[:, 0] * li + w[:, 1] * lt
        fused = self.fusion_mlp(torch.cat([li, lt], dim=1))
        return torch.where((use_image & use_text)[:, None], fused, torch.where(use_image[:, None], li, lt))

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.fuse(*self.branches(image, input_ids, attention_mask))

    def loss(self, image, input_ids, attention_mask, y, criterion: nn.Module, branch_weight: float = 1.0):
        """Fused cross-entropy plus ``branch_weight`` x each branch's own, over the rows that have its modality."""
        li, lt, has_image, has_text = self.branches(image, input_ids, attention_mask)
        total = criterion(self.fuse(li, lt, has_image, has_text), y)
        if branch_weight > 0:
            for logits, present in ((li, has_image), (lt, has_text)):
                if bool(present.any()):
                    total = total + branch_weight * criterion(logits[present], y[present])
        return total


# ---------------------------------------------------------------------------------------------- inputs
def tokenize(tokenizer, texts: list, max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Word-piece ids and attention mask (N, max_length) int64, without special tokens: the RNN reads the words.

    A text that is None/NaN/empty (after ``crossmodal.data.text.clean_text``) gets an all-zero mask: absent.
    """
    from crossmodal.data.manifest import is_absent
    from crossmodal.data.text import clean_text

    cleaned = ["" if is_absent(t) else clean_text(t) for t in texts]
    if not cleaned:
        return torch.zeros((0, max_length), dtype=torch.long), torch.zeros((0, max_length), dtype=torch.long)
    enc = tokenizer(cleaned, add_special_tokens=False, padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return enc["input_ids"].long(), enc["attention_mask"].long()


def predict_proba(head: CnnRnnHead, image: np.ndarray, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  batch_size: int = 1024) -> np.ndarray:
    """Softmax probabilities (N, C) float32 in eval mode (each row computed on its own, whatever the batch)."""
    head.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(image), batch_size):
            xi = torch.from_numpy(np.ascontiguousarray(image[i : i + batch_size], dtype=np.float32))
            logits = head(xi, input_ids[i : i + batch_size], attention_mask[i : i + batch_size])
            out.append(torch.softmax(logits, dim=1).numpy())
    if not out:
        return np.zeros((0, head.init_args["num_classes"]), dtype=np.float32)
    return np.concatenate(out).astype(np.float32)


# ---------------------------------------------------------------------------------------------- loading
def load_cnn_rnn(directory: str | Path, text_encoder: TextEncoder | None = None) -> CnnRnnHead:
    """Rebuild a saved head (``heads.files.save_head`` wrote it) on ``text_encoder``'s word embeddings (loaded by
    the name in ``head.json`` when None); eval mode. TrainError when the weights or the table do not match."""
    from safetensors.torch import load_file

    from crossmodal.encoders.registry import canonical_name, load_text_encoder

    directory = Path(directory)
    for fname in (HEAD_FILE, WEIGHTS_FILE):
        if not (directory / fname).is_file():
            raise FileNotFoundError(f"{directory / fname} is missing; run `crossmodal train` to create the head")
    args = dict(json.loads((directory / HEAD_FILE).read_text())["init_args"])
    name = args["text_encoder"]
    if text_encoder is None or canonical_name(text_encoder.name) != canonical_name(name):
        text_encoder = load_text_encoder(name, "cpu")
    args.pop("name"), args.pop("text_dim"), args.pop("vocab_size")
    head = CnnRnnHead(args.pop("image_dim"), embedding_table(text_encoder), args.pop("num_classes"), **args)
    try:
        head.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    except RuntimeError as err:
        raise TrainError(f"{directory / WEIGHTS_FILE} does not match {directory / HEAD_FILE}: {err}") from None
    return head.eval()
