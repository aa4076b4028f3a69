"""The fused model as users call it: raw image + text in, label and class probabilities out.

A :class:`FusedModel` is the pretrained encoders (by name, with their preprocessing) plus one trained head, saved as
a folder (``model.json`` + ``head/``, written by ``crossmodal.serving.package``) and served as an MLflow pyfunc
(models-from-code, no pickle):

    import mlflow, pandas as pd
    m = mlflow.pyfunc.load_model("models:/crossmodal-fusion@champion")
    m.predict(pd.DataFrame({"image_bytes": [open("photo.jpg", "rb").read()], "text": ["What a wonderful day"]}))
    #    label   prob_neutral  prob_sarcastic  prob_sincere
    m.predict(frame, params={"attribution": True})     # adds attr_image, attr_text (+ gate_image, gate_text)

Input: ``text`` and, per row, ``image_bytes`` (base64 over REST) or ``image`` (a path); a row may lack one of the
two and is then predicted from the other. Output: ``label`` and one ``prob_<label>`` per class, calibrated by the
head's temperature from ``model.json`` (the label is unchanged by it). Attribution is the drop of the predicted
class's probability when that modality is removed (over REST: ``{"params": {"attribution": true}}``). Paths are
refused unless the model was logged with ``serving.allowed_image_root``, and then read only when they resolve
(``..`` and symlinks included) inside that folder; a bad row is a :class:`PredictionInputError` (HTTP 400 when
served).

:meth:`FusedModel.load` returns the variant a head needs: :class:`FinetunedFusedModel` for the fine-tuned head,
:class:`CnnRnnFusedModel` for ``cnn_rnn`` (image features and the texts' word pieces), :class:`EnsembleFusedModel` for
an ensemble with such members, same interface.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

try:  # the pyfunc wrapper needs MLflow; FusedModel itself does not
    from mlflow.pyfunc import PythonModel
except ImportError:  # pragma: no cover
    PythonModel = object  # type: ignore[misc,assignment]

from crossmodal.artifacts import HEAD_FILE, MEMBERS_DIR, MODEL_FILE
from crossmodal.config import FINETUNED_HEADS, RNN_HEADS, EncodersConfig
from crossmodal.data.manifest import is_absent
from crossmodal.errors import PredictionInputError
from crossmodal.serving.package import HEAD_DIR

PREDICT_CHUNK = 256  # rows decoded and embedded at a time by FusedModel.predict


class FusedModel:
    """Frozen-feature encoders plus a trained head; :meth:`load` reads a saved folder (a fine-tuned head's too)."""

    def __init__(self, head, labels: list[str], encoders: EncodersConfig, head_name: str = "",
                 max_pixels: int | None = None, temperature: float = 1.0, allowed_image_root: str | None = None,
                 extractor=None):
        from crossmodal.features.extractor import FeatureExtractor

        self._serving_options(temperature, allowed_image_root)
        self.head = head.eval()
        self.labels = list(labels)
        self.head_name = head_name
        # ``extractor``: one already built for these encoders (an ensemble's members share theirs)
        self.extractor = extractor or FeatureExtractor(encoders, max_pixels=max_pixels)

    def _serving_options(self, temperature: float, allowed_image_root: str | None) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)
        self.allowed_image_root = allowed_image_root  # None: image paths refused (bytes only)

    def _calibrated(self, proba: np.ndarray) -> np.ndarray:
        """The head's probabilities after its temperature (fitted on validation by the evaluation)."""
        if self.temperature == 1.0:
            return proba
        from crossmodal.evaluation.calibration import apply_temperature

        return apply_temperature(proba, self.temperature)

    @classmethod
    def load(cls, directory: str | Path, allowed_image_root: str | None = None) -> FusedModel:
        """Load a saved model; ``allowed_image_root`` overrides the folder stored in it (``serving.allowed_image_root``)."""
        from crossmodal.heads.files import load_head

        directory = Path(directory)
        spec = json.loads((directory / MODEL_FILE).read_text())
        if spec.get("head") in FINETUNED_HEADS:
            return FinetunedFusedModel.load(directory, allowed_image_root)
        if spec.get("head") in RNN_HEADS:
            return CnnRnnFusedModel.load(directory, allowed_image_root)
        if (directory / HEAD_DIR / MEMBERS_DIR).is_dir():
            return EnsembleFusedModel.load(directory, allowed_image_root)
        head = load_head(directory / HEAD_DIR)
        return cls(head, spec["labels"], EncodersConfig.model_validate(spec["encoders"]), spec.get("head", ""),
                   spec.get("max_image_pixels"), spec.get("temperature", 1.0),
                   allowed_image_root or spec.get("allowed_image_root"))

    def _image_path(self, i: int, path: str) -> str:
        """``path`` resolved, if it may be read: inside ``allowed_image_root`` after ``..`` and symlinks."""
        if self.allowed_image_root is None:
            raise PredictionInputError(
                f"row {i}: image paths are refused by this model (serving.allowed_image_root is not set); send the "
                "image file's bytes in 'image_bytes' (base64 in a REST request)")
        root = os.path.realpath(self.allowed_image_root)
        if "\x00" in path:
            raise PredictionInputError(f"row {i}: image path contains a NUL character; refused")
        real = os.path.realpath(os.path.join(root, path))  # an absolute path replaces root here
        if os.path.commonpath([real, root]) != root:
            raise PredictionInputError(f"row {i}: image path {path!r} is outside the allowed image root {root} "
                                       "(serving.allowed_image_root); refused")
        return real

    def _image_source(self, i: int, row) -> str | bytes | None:
        """The row's image as bytes or an allowed path; None when the row has no image (null or empty cells)."""
        raw = getattr(row, "image_bytes", None)
        if isinstance(raw, str) and raw:  # base64 text (what a JSON client sends for a binary column)
            try:
                raw = base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError):
                raise PredictionInputError(f"row {i}: 'image_bytes' is text but not base64; send the file's bytes, "
                                           "base64-encoded") from None
        if isinstance(raw, bytes | bytearray | memoryview) and len(raw):
            return bytes(raw)
        path = getattr(row, "image", None)
        if isinstance(path, str) and path.strip():
            return self._image_path(i, path)
        if path is None or _is_null(path) or isinstance(path, str):
            return None
        raise PredictionInputError(f"row {i}: 'image' must be a path string (or use 'image_bytes'), got "
                                   f"{type(path).__name__}")

    @property
    def has_gates(self) -> bool:
        return bool(getattr(self.head, "has_gates", False))

    def features(self, images: list[Any] | None, texts: list[str | None] | None) -> tuple[np.ndarray, np.ndarray]:
        """Embed what is present; an absent image or text (None, an empty text, or the whole list None) becomes an
        all-NaN feature row, never encoded."""
        from crossmodal.data.images import ImageError
        from crossmodal.data.text import clean_text

        if images is None and texts is None:
            raise PredictionInputError("give images, texts or both")
        n = len(images) if images is not None else len(texts)
        if images is not None and texts is not None and len(images) != len(texts):
            raise PredictionInputError(f"{len(images)} images but {len(texts)} texts: give one of each per row")
        images = [None] * n if images is None else list(images)
        texts = [None] * n if texts is None else [None if t is None or not clean_text(t) else t for t in texts]
        image_dim, text_dim = self._feature_dims()
        img = np.full((n, image_dim), np.nan, dtype=np.float32)
        txt = np.full((n, text_dim), np.nan, dtype=np.float32)
        has_image = [k for k in range(n) if images[k] is not None]
        has_text = [k for k in range(n) if texts[k] is not None]
        if has_image:
            try:
                img[has_image] = self.extractor.embed_images([images[k] for k in has_image])
            except ImageError as err:
                raise PredictionInputError(str(err)) from None
        if has_text:
            txt[has_text] = self.extractor.embed_texts([texts[k] for k in has_text])
        return img, txt

    def _feature_dims(self) -> tuple[int, int]:
        return self.head.init_args["image_dim"], self.head.init_args["text_dim"]

    def proba_from_features(self, img: np.ndarray, txt: np.ndarray) -> np.ndarray:
        """Class probabilities (N, C) of embedded rows: the one place features become probabilities, so
        predictions and attribution always agree."""
        from crossmodal.heads.inference import predict_proba

        proba = predict_proba(self.head, img, txt)
        return self._calibrated(proba)

    def predict_proba(self, images: list[Any] | None, texts: list[str | None] | None) -> np.ndarray:
        """Class probabilities (N, C); ``None`` for an absent image or text (or for a whole modality)."""
        return self.proba_from_features(*self.features(images, texts))

    def explain(self, images: list[Any] | None, texts: list[str | None] | None) -> dict[str, np.ndarray]:
        """Probabilities plus leave-one-modality-out attribution (and gates, for heads with gates), embedding once.

        ``attr_image`` / ``attr_text``: p(predicted class) with both minus p(predicted class) without that
        modality. Returns {"proba", "attr_image", "attr_text"[, "gate_image", "gate_text"]}.
        """
        from crossmodal.heads.inference import predict_gates, without

        img, txt = self.features(images, texts)
        proba = self.proba_from_features(img, txt)
        rows, pred = np.arange(len(proba)), proba.argmax(axis=1)
        out = {"proba": proba,
               "attr_image": proba[rows, pred] - self.proba_from_features(without(img), txt)[rows, pred],
               "attr_text": proba[rows, pred] - self.proba_from_features(img, without(txt))[rows, pred]}
        gates = predict_gates(self.head, img, txt)
        if gates is not None:
            out["gate_image"], out["gate_text"] = gates[:, 0], gates[:, 1]
        return out

    def predict(self, frame: pd.DataFrame | dict | list, attribution: bool = False) -> pd.DataFrame:
        """Labels and probabilities for each row, streamed PREDICT_CHUNK rows at a time (bounded memory)."""
        frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(frame)
        if len(frame) <= PREDICT_CHUNK:
            return self._predict_rows(frame, attribution=attribution)
        return pd.concat([self._predict_rows(frame.iloc[s : s + PREDICT_CHUNK], offset=s, attribution=attribution)
                          for s in range(0, len(frame), PREDICT_CHUNK)], ignore_index=True)

    def _predict_rows(self, frame: pd.DataFrame, offset: int = 0, attribution: bool = False) -> pd.DataFrame:
        from crossmodal.data.text import clean_text

        frame = frame if isinstance(frame, pd.DataFrame) else pd.DataFrame(frame)
        if not {"text", "image", "image_bytes"} & set(frame.columns):
            raise PredictionInputError("input needs a 'text' column, an 'image' (path) or 'image_bytes' column, or "
                                       f"both; got columns {list(frame.columns)}")
        images, texts = [], []
        for i, row in enumerate(frame.itertuples(index=False), start=offset):
            source = self._image_source(i, row)  # None: this row has no image, predicted from its text
            text = getattr(row, "text", None)
            if _is_null(text):
                text = None
            elif not isinstance(text, str):
                raise PredictionInputError(f"row {i}: 'text' must be a string, got {type(text).__name__}")
            else:
                text = clean_text(text) or None
            if source is None and text is None:
                raise PredictionInputError(f"row {i}: no image and no text (give a path in 'image', bytes in "
                                           "'image_bytes', a 'text', or both)")
            images.append(source)
            texts.append(text)
        extra = ["attr_image", "attr_text"] + (["gate_image", "gate_text"] if self.has_gates else [])
        if not images:
            return pd.DataFrame({"label": [], **{f"prob_{c}": [] for c in self.labels},
                                 **({c: [] for c in extra} if attribution else {})})
        result = self.explain(images, texts) if attribution else {"proba": self.predict_proba(images, texts)}
        proba = result["proba"]
        out = pd.DataFrame({f"prob_{c}": proba[:, k].astype("float64") for k, c in enumerate(self.labels)})
        out.insert(0, "label", [self.labels[k] for k in proba.argmax(axis=1)])
        if attribution:
            for column in extra:
                out[column] = result[column].astype("float64")
        return out


def _is_null(value: Any) -> bool:
    """None, NaN, pd.NA / NaT: a cell a data frame leaves empty."""
    if value is None or value is pd.NA or value is pd.NaT:
        return True
    return isinstance(value, float) and value != value


def present_rows(images: list | None, texts: list | None) -> tuple[list, list]:
    """Rows as lists, None for an absent image or text (an empty text is absent); PredictionInputError for a row
    with neither or for lists of different lengths."""
    from crossmodal.data.text import clean_text

    n = len(images) if images is not None else len(texts) if texts is not None else 0
    images = [None if is_absent(x) else x for x in images] if images is not None else [None] * n
    texts = [None if is_absent(t) else t for t in texts] if texts is not None else [None] * n
    if len(images) != len(texts):
        raise PredictionInputError(f"{len(images)} images but {len(texts)} texts; give one of each per row")
    for i, (img, txt) in enumerate(zip(images, texts)):
        if img is None and (txt is None or not clean_text(txt)):
            raise PredictionInputError(f"row {i}: no image and no text; give at least one")
    return images, [t if t is not None and clean_text(t) else None for t in texts]


class FinetunedFusedModel(FusedModel):
    """The fine-tuned cross-attention model (``crossmodal.heads.xattn``): its own tuned encoders, raw inputs in.

    Same interface as :class:`FusedModel`; images are decoded and texts tokenised by the very functions used in
    training (``crossmodal.heads.xattn_inputs.prepare_inputs`` over ``crossmodal.data.images``). ``predict_proba`` accepts
    None for an absent image or text: that row then goes through the model's learned placeholder.
    """

    def __init__(self, network, labels: list[str], encoders: EncodersConfig, head_name: str = "",
                 max_pixels: int | None = None, temperature: float = 1.0, allowed_image_root: str | None = None):
        from crossmodal.hardware import resolve_device, resolve_precision

        self._serving_options(temperature, allowed_image_root)
        self.device = resolve_device(encoders.device)
        self.dtype = resolve_precision(encoders.precision, self.device)
        self.network = network.to(self.device).eval()
        self.head = self.network  # what FusedModel users find under .head: the module that predicts
        self.labels, self.head_name, self.max_pixels = list(labels), head_name, max_pixels
        self.extractor = None  # no frozen feature extractor: the network reads pixels and tokens

    @classmethod
    def load(cls, directory: str | Path, allowed_image_root: str | None = None) -> FinetunedFusedModel:
        from crossmodal.heads.xattn import load_finetuned

        directory = Path(directory)
        spec = json.loads((directory / MODEL_FILE).read_text())
        encoders = EncodersConfig.model_validate(spec["encoders"])
        from crossmodal.hardware import resolve_device

        network, _ = load_finetuned(directory / HEAD_DIR, resolve_device(encoders.device))
        return cls(network, spec["labels"], encoders, spec.get("head", ""), spec.get("max_image_pixels"),
                   spec.get("temperature", 1.0), allowed_image_root or spec.get("allowed_image_root"))

    @property
    def has_gates(self) -> bool:
        return False

    def explain(self, images: list[Any] | None, texts: list[str | None] | None) -> dict[str, np.ndarray]:
        """Probabilities plus leave-one-modality-out attribution (the absent modality goes through the placeholder)."""
        proba = self.predict_proba(images, texts)
        n = len(proba)
        pred = proba.argmax(axis=1)
        images = list(images) if images is not None else [None] * n
        texts = list(texts) if texts is not None else [None] * n
        out = {"proba": proba, "attr_image": np.zeros(n), "attr_text": np.zeros(n)}
        # Removing the only modality a row has leaves nothing to predict from: its attribution is the whole
        # prediction, so only rows that keep something are re-scored.
        for key, keep in (("attr_image", [k for k in range(n) if not is_absent(texts[k])]),
                          ("attr_text", [k for k in range(n) if not is_absent(images[k])])):
            if not keep:
                continue
            sub_img = [None if key == "attr_image" else images[k] for k in keep]
            sub_txt = [None if key == "attr_text" else texts[k] for k in keep]
            reduced = self.predict_proba(sub_img, sub_txt)
            out[key][keep] = proba[keep, pred[keep]] - reduced[np.arange(len(keep)), pred[keep]]
        return out

    def predict_proba(self, images: list[Any] | None, texts: list[str | None] | None) -> np.ndarray:
        from crossmodal.data.images import ImageError
        from crossmodal.heads.xattn_inputs import predict_proba, prepare_inputs

        n = len(images) if images is not None else len(texts) if texts is not None else 0
        images = list(images) if images is not None else [None] * n
        texts = list(texts) if texts is not None else [None] * n
        if len(images) != len(texts):
            raise PredictionInputError(f"{len(images)} images but {len(texts)} texts; give one of each per row")
        for i, (img, txt) in enumerate(zip(images, texts)):
            if is_absent(img) and is_absent(txt):
                raise PredictionInputError(f"row {i}: no image and no text; give at least one")
        args = self.network.init_args
        text = self.network.text
        try:
            inputs = prepare_inputs(images, texts, text.tokenizer, args["image_size"],
                                    min(args["max_length"], text.max_positions), self.max_pixels)
        except ImageError as err:
            raise PredictionInputError(str(err)) from None
        proba = predict_proba(self.network, inputs, dtype=self.dtype)
        return self._calibrated(proba)


class CnnRnnFusedModel(FusedModel):
    """The ``cnn_rnn`` head (``crossmodal.heads.cnn_rnn``): the image encoder's pooled features and the text
    encoder's word pieces, from raw rows as :class:`FusedModel` takes them.

    Images go through the run's feature extractor (the features the head was trained on), texts through the text
    encoder's tokenizer with the function training used (``crossmodal.heads.cnn_rnn.tokenize``); the head's word
    embeddings are that encoder's table, loaded once with it. :meth:`features` still gives both modalities' frozen
    embeddings (what ``crossmodal predict`` compares with the drift reference); :meth:`score` returns them with the
    probabilities, each image encoded once.
    """

    def __init__(self, head, extractor, labels: list[str], head_name: str = "", temperature: float = 1.0,
                 allowed_image_root: str | None = None):
        self._serving_options(temperature, allowed_image_root)
        self.head = head.eval()
        self.labels, self.head_name = list(labels), head_name
        self.extractor = extractor
        self.tokenizer = extractor.text_encoder.tokenizer

    @classmethod
    def load(cls, directory: str | Path, allowed_image_root: str | None = None) -> CnnRnnFusedModel:
        from crossmodal.features.extractor import FeatureExtractor
        from crossmodal.heads.cnn_rnn import load_cnn_rnn

        directory = Path(directory)
        spec = json.loads((directory / MODEL_FILE).read_text())
        extractor = FeatureExtractor(EncodersConfig.model_validate(spec["encoders"]),
                                     max_pixels=spec.get("max_image_pixels"))
        head = load_cnn_rnn(directory / HEAD_DIR, extractor.text_encoder)
        return cls(head, extractor, spec["labels"], spec.get("head", ""), spec.get("temperature", 1.0),
                   allowed_image_root or spec.get("allowed_image_root"))

    def image_features(self, images: list) -> np.ndarray:
        """The image encoder's features (N, image_dim), all-NaN rows where ``images[k]`` is None."""
        from crossmodal.data.images import ImageError

        img = np.full((len(images), self.head.init_args["image_dim"]), np.nan, dtype=np.float32)
        present = [k for k, x in enumerate(images) if x is not None]
        if present:
            try:
                img[present] = self.extractor.embed_images([images[k] for k in present])
            except ImageError as err:
                raise PredictionInputError(str(err)) from None
        return img

    def proba_from_inputs(self, img: np.ndarray, input_ids, attention_mask) -> np.ndarray:
        """Calibrated probabilities (N, C) of image features and tokens (``heads.cnn_rnn.tokenize``)."""
        from crossmodal.heads.cnn_rnn import predict_proba

        return self._calibrated(predict_proba(self.head, img, input_ids, attention_mask))

    def proba_from_features(self, img: np.ndarray, txt: np.ndarray) -> np.ndarray:
        raise TypeError("the cnn_rnn head reads word pieces, not text embeddings: use predict_proba(images, texts) "
                        "or score(images, texts)")

    def score(self, images: list | None, texts: list | None, attribution: bool = False,
              embeddings: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None,
                                                  np.ndarray | None]:
        """(probabilities, attribution columns (empty unless ``attribution``), image features, text embeddings);
        the two embeddings only with ``embeddings`` (None otherwise), images encoded once for all of it."""
        from crossmodal.heads.cnn_rnn import tokenize

        images, texts = present_rows(images, texts)
        img = self.image_features(images)
        ids, mask = tokenize(self.tokenizer, texts, self.head.init_args["max_length"])
        proba = self.proba_from_inputs(img, ids, mask)
        extra: dict[str, np.ndarray] = {}
        if attribution:
            from crossmodal.heads.inference import without

            rows, pred = np.arange(len(proba)), proba.argmax(axis=1)
            extra["attr_image"] = proba[rows, pred] - self.proba_from_inputs(without(img), ids, mask)[rows, pred]
            no_text = mask.new_zeros(mask.shape)
            extra["attr_text"] = proba[rows, pred] - self.proba_from_inputs(img, ids, no_text)[rows, pred]
        txt = None
        if embeddings:
            txt = np.full((len(texts), self.extractor.text_dim), np.nan, dtype=np.float32)
            present = [k for k, t in enumerate(texts) if t is not None]  # as FusedModel.features embeds them
            if present:
                txt[present] = self.extractor.embed_texts([texts[k] for k in present])
        return proba, extra, (img if embeddings else None), txt

    def predict_proba(self, images: list[Any] | None, texts: list[str | None] | None) -> np.ndarray:
        return self.score(images, texts)[0]

    def explain(self, images: list[Any] | None, texts: list[str | None] | None) -> dict[str, np.ndarray]:
        """Probabilities plus leave-one-modality-out attribution: the head without that branch."""
        proba, extra, _, _ = self.score(images, texts, attribution=True)
        return {"proba": proba, **extra}


class EnsembleFusedModel(FusedModel):
    """The ``ensemble`` with members on other inputs than the frozen features (``train.ensemble.pool: all``).

    The frozen-feature members are one averaged head on the shared encoders; ``cnn_rnn`` reads the same image
    features and the text encoder's word pieces (each image encoded once for both); ``finetune_xattn`` runs its own
    tuned encoders. Each member predicts uncalibrated, as in training's predictions; they are pooled as training
    pooled them (``init_args``: weights, member temperatures, pooling; ``crossmodal.heads.averaged``), and the pool
    then takes the ensemble's temperature. :meth:`features` gives the frozen embeddings (``crossmodal predict``'s drift
    space); :meth:`score` returns them with the probabilities.
    """

    def __init__(self, parts: dict[str, tuple[FusedModel, float, float]], extractor, labels: list[str],
                 head_name: str = "", temperature: float = 1.0, allowed_image_root: str | None = None,
                 pooling: str = "mean"):
        self._serving_options(temperature, allowed_image_root)
        # {"frozen" | "cnn_rnn" | "finetuned": (model, weight, member temperature)}, weights summing to 1; the
        # frozen part applies its members' temperatures itself (its own is 1).
        self.parts = parts
        self.pooling = pooling
        self.labels, self.head_name = list(labels), head_name
        self.extractor = extractor
        frozen = parts.get("frozen")
        self.head = frozen[0].head if frozen else None

    @classmethod
    def load(cls, directory: str | Path, allowed_image_root: str | None = None) -> EnsembleFusedModel:
        from crossmodal.features.extractor import FeatureExtractor
        from crossmodal.hardware import resolve_device
        from crossmodal.heads.averaged import EnsembleChoice
        from crossmodal.heads.cnn_rnn import load_cnn_rnn
        from crossmodal.heads.files import load_head
        from crossmodal.heads.registry import ensemble_of
        from crossmodal.heads.xattn import load_finetuned

        directory = Path(directory)
        spec = json.loads((directory / MODEL_FILE).read_text())
        encoders = EncodersConfig.model_validate(spec["encoders"])
        members_dir = directory / HEAD_DIR / MEMBERS_DIR
        mix = EnsembleChoice.from_init_args(json.loads((directory / HEAD_DIR / HEAD_FILE).read_text())["init_args"])
        weights, temperatures, pooling = mix.weights, mix.temperatures, mix.pooling
        extractor = FeatureExtractor(encoders, max_pixels=spec.get("max_image_pixels"))
        labels, pixels = spec["labels"], spec.get("max_image_pixels")
        parts: dict[str, tuple[FusedModel, float, float]] = {}
        frozen = [n for n in weights if n not in RNN_HEADS and n not in FINETUNED_HEADS]
        if frozen:
            head = ensemble_of([load_head(members_dir / n) for n in frozen], [weights[n] for n in frozen],
                               [temperatures[n] for n in frozen], pooling)
            parts["frozen"] = (FusedModel(head, labels, encoders, "ensemble", pixels, extractor=extractor),
                               sum(weights[n] for n in frozen), 1.0)
        for name, weight in weights.items():
            if name in RNN_HEADS:
                parts["cnn_rnn"] = (CnnRnnFusedModel(load_cnn_rnn(members_dir / name, extractor.text_encoder),
                                                     extractor, labels, name), weight, temperatures[name])
            elif name in FINETUNED_HEADS:
                network, _ = load_finetuned(members_dir / name, resolve_device(encoders.device))
                parts["finetuned"] = (FinetunedFusedModel(network, labels, encoders, name, pixels), weight,
                                      temperatures[name])
        return cls(parts, extractor, labels, spec.get("head", ""), spec.get("temperature", 1.0),
                   allowed_image_root or spec.get("allowed_image_root"), pooling)

    @property
    def has_gates(self) -> bool:
        return False

    def _feature_dims(self) -> tuple[int, int]:
        return self.extractor.image_dim, self.extractor.text_dim

    def proba_from_features(self, img: np.ndarray, txt: np.ndarray) -> np.ndarray:
        raise TypeError("this ensemble has members that read word pieces or pixels, not embeddings: use "
                        "predict_proba(images, texts) or score(images, texts)")

    def _mix(self, images: list, texts: list, img: np.ndarray, txt: np.ndarray) -> np.ndarray:
        """The members pooled (before the ensemble's temperature) on rows whose frozen embeddings are ``img`` /
        ``txt``."""
        from crossmodal.heads.averaged import pool_probabilities
        from crossmodal.heads.cnn_rnn import tokenize
        from crossmodal.heads.inference import predict_proba

        probas, weights, temperatures = [], [], []
        for kind, (model, weight, temperature) in self.parts.items():
            if kind == "frozen":
                proba = predict_proba(model.head, img, txt)
            elif kind == "cnn_rnn":
                ids, mask = tokenize(model.tokenizer, texts, model.head.init_args["max_length"])
                proba = model.proba_from_inputs(img, ids, mask)
            else:
                proba = model.predict_proba(images, texts)
            probas.append(proba), weights.append(weight), temperatures.append(temperature)
        return pool_probabilities(probas, weights, temperatures, self.pooling)

    def score(self, images: list | None, texts: list | None, attribution: bool = False,
              embeddings: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None,
                                                  np.ndarray | None]:
        """(probabilities, attribution columns (empty unless ``attribution``), image and text embeddings (None
        unless ``embeddings``)); every image through the frozen encoder once for all of it."""
        from crossmodal.heads.inference import without

        images, texts = present_rows(images, texts)
        img, txt = self.features(images, texts)
        n = len(img)
        proba = self._calibrated(self._mix(images, texts, img, txt))
        extra: dict[str, np.ndarray] = {}
        if attribution:
            rows, pred = np.arange(n), proba.argmax(axis=1)
            # Removing the only modality a row has leaves nothing: its attribution is the whole prediction.
            for key, keep in (("attr_image", [k for k in range(n) if texts[k] is not None]),
                              ("attr_text", [k for k in range(n) if images[k] is not None])):
                extra[key] = proba[rows, pred].astype(np.float64)
                if not keep:
                    continue
                sub_images, sub_img = [images[k] for k in keep], img[keep]
                sub_texts, sub_txt = [texts[k] for k in keep], txt[keep]
                if key == "attr_image":
                    sub_images, sub_img = [None] * len(keep), without(sub_img)
                else:
                    sub_texts, sub_txt = [None] * len(keep), without(sub_txt)
                reduced = self._calibrated(self._mix(sub_images, sub_texts, sub_img, sub_txt))
                extra[key][keep] -= reduced[np.arange(len(keep)), pred[keep]]
        return proba, extra, (img if embeddings else None), (txt if embeddings else None)

    def predict_proba(self, images: list[Any] | None, texts: list[str | None] | None) -> np.ndarray:
        return self.score(images, texts)[0]

    def explain(self, images: list[Any] | None, texts: list[str | None] | None) -> dict[str, np.ndarray]:
        """Probabilities plus leave-one-modality-out attribution: every member without that modality."""
        proba, extra, _, _ = self.score(images, texts, attribution=True)
        return {"proba": proba, **extra}


class CrossmodalPyfunc(PythonModel):
    """MLflow wrapper: the state lives in the ``fused_model`` artifact folder, read in ``load_context``."""

    def load_context(self, context):
        self.model = FusedModel.load(context.artifacts["fused_model"])
        if isinstance(self.model, FinetunedFusedModel):
            return  # its (fine-tuned) encoders load with it
        # Load both encoders now, not on the first request (a server's first call would otherwise take seconds).
        self.model.extractor.image_encoder, self.model.extractor.text_encoder  # noqa: B018

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self.model.predict(model_input, attribution=bool((params or {}).get("attribution", False)))
        except PredictionInputError as err:
            # An MlflowException keeps our message in the scoring server's answer (HTTP 400); any other exception
            # becomes a generic "unexpected error" with a stack trace.
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None
