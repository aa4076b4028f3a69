"""A trained head on disk: ``weights.safetensors`` (never pickle) and ``head.json`` (how to rebuild it).

    from crossmodal.heads.files import save_head, load_head
    save_head(head, "work/models/gated", {"best_epoch": 7})
    head = load_head("work/models/gated")         # nn.Module in eval mode

Training (``crossmodal.training.tasks``) saves heads this way; the served model
(``crossmodal.serving.fused_model``) loads them.
"""

from __future__ import annotations

import json
from pathlib import Path

from crossmodal.artifacts import HEAD_FILE, WEIGHTS_FILE
from crossmodal.errors import TrainError


def save_head(head, directory: str | Path, info: dict | None = None) -> Path:
    """Write ``weights.safetensors`` and ``head.json`` (name, modality, init_args + ``info``) into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in head.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_FILE), metadata={"head": head.init_args["name"]})
    meta = {"name": head.init_args["name"], "modality": head.modality, "init_args": head.init_args, **(info or {})}
    (directory / HEAD_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_head(directory: str | Path):
    """Rebuild a head from ``head.json`` and load ``weights.safetensors``; returned in eval mode."""
    from safetensors.torch import load_file

    from crossmodal.heads.registry import build_head

    directory = Path(directory)
    for fname in (HEAD_FILE, WEIGHTS_FILE):
        if not (directory / fname).is_file():
            raise FileNotFoundError(f"{directory / fname} is missing; run `crossmodal train` to create the head")
    meta = json.loads((directory / HEAD_FILE).read_text())
    head = build_head(**meta["init_args"])
    try:
        head.load_state_dict(load_file(str(directory / WEIGHTS_FILE)), strict=True)
    except RuntimeError as err:
        raise TrainError(f"{directory / WEIGHTS_FILE} does not match {directory / HEAD_FILE}: {err}") from None
    return head.eval()
