"""``crossmodal predict``: a registered model (the champion by default) on a new manifest, with drift checks.

    from crossmodal.config import load_config
    from crossmodal.pipeline.predict import predict_manifest, render
    summary = predict_manifest(load_config(), "data/new/manifest.csv", "out/predictions.parquet")
    print(render(summary))
    # rows: 500 in = 497 predicted + 3 refused (see out/refused.csv)
    # model: crossmodal-fusion version 4 (gated)
    # drift (alpha 0.01): image MMD2=0.00041 p=0.412 ok (n=497), text MMD2=0.0213 p=0.002 DRIFTED (n=497),
    #   labels TV=0.031 p=0.331 ok (n=497)

Chunk by chunk (``chunk_rows``; memory stays flat whatever the manifest's size):

1. Each row gets the row checks of training (``crossmodal.validation.rows.check_rows`` with ``validation``
   settings, then the id and text checks the training suite adds: id present and unique, text present unless
   ``validation.allow_missing`` allows it, text length). A missing label is no reason to refuse. A refused row
   goes to the refused file (``refused.csv`` next to the output unless given: ``_row``, every original column,
   ``reason``); rows in = predicted + refused, always.
2. Kept rows: the image file's bytes are read under the data root (the manifest's folder, or ``data.data_root``)
   and embedded once by the model's frozen encoders (``FusedModel.features``); those embeddings give the
   probabilities (``proba_from_features``) and feed the drift sample (a seeded reservoir of ``drift.max_rows``
   rows per modality). A fine-tuned model reads the raw inputs itself; its drift embeddings come from the frozen
   encoders named in its ``model.json``, the space its drift reference was sampled in. A ``cnn_rnn`` model reads
   the image features and the texts' word pieces (``CnnRnnFusedModel.score``), embedding texts only for drift; an
   ensemble with such members (``EnsembleFusedModel.score``) embeds both once and feeds each member its inputs.
3. Predictions are appended to the output parquet (``id, label, prob_<class>``[, ``attr_*``, ``gate_*``]), written
   to a temporary file and renamed onto the output at the end.

Then: the drift tests (``crossmodal.evaluation.drift``) against the version's drift reference
(``crossmodal.registry.drift_artifact``), accuracy and macro-F1 when the manifest has labels, the summary JSON
(``predict_summary.json`` next to the output unless given) and one MLflow run in experiment
``<mlflow.experiment>-predictions``, tagged ``crossmodal.kind=predict``, the counts and drift figures as metrics,
the summary as an artifact. Prediction batches get their own experiment so that they never crowd the training
runs (and the run counts scripts read) of the experiment the models come from. The summary::

    {"rows": {"in", "predicted", "refused", "refused_file"}, "model": {"name", "version", "head", "run_id"},
     "manifest", "output", "summary_file",
     "drift": {"image": {"statistic", "p_value", "drifted", "n", ...}, "text": {...}, "labels": {...}},
     "metrics": {"rows", "accuracy", "macro_f1"} (only with labels), "mlflow": {"experiment_id", "run_id"}}

Without a drift reference (a version logged before they existed) the three drift entries are None and
``drift["reason"]`` says why.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crossmodal.artifacts import MODEL_FILE, PREDICT_SUMMARY_FILE, REFUSED_FILE
from crossmodal.config import Columns, Config, ValidationConfig
from crossmodal.data.manifest import manifest_columns, read_manifest
from crossmodal.data.text import clean_text
from crossmodal.errors import DataError, ModelUnavailable, PredictionInputError, TrackingUnavailable
from crossmodal.evaluation.drift import heldout_mmd_test, label_shift_test, label_test, mmd_test
from crossmodal.evaluation.drift_reference import DriftReference, embedding_space
from crossmodal.files import atomic_path, write_json
from crossmodal.validation.rows import check_rows, text_absent
from crossmodal.validation.validate import normalize_label

log = logging.getLogger(__name__)

CHUNK_ROWS = 256
PREDICTIONS_EXPERIMENT_SUFFIX = "-predictions"
KIND_TAG, KIND = "crossmodal.kind", "predict"
FUSED_MODEL_ARTIFACT = "artifacts/fused_model"  # where the pyfunc keeps the FusedModel folder (artifacts=...)
_ROW_PREFIX = re.compile(r"^row \d+: ")


# ----------------------------------------------------------------------------- the model
@dataclass
class RegisteredModel:
    name: str
    version: str
    run_id: str | None  # the run that logged it (and its drift reference)
    model: Any  # crossmodal.serving.fused_model.FusedModel (or FinetunedFusedModel)
    spec: dict[str, Any]  # its model.json


def resolve_version(name: str, version: str | int | None = None) -> tuple[str, str | None]:
    """(version, run id) of ``name``'s champion, or of ``version``; ModelUnavailable when there is none."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from crossmodal.registry.promotion import CHAMPION

    client = MlflowClient()
    try:
        mv = (client.get_model_version_by_alias(name, CHAMPION) if version is None
              else client.get_model_version(name, str(version)))
    except MlflowException:
        if version is None:
            raise ModelUnavailable(f"no version of {name} holds alias {CHAMPION}: run crossmodal run first or pass "
                                   "--version") from None
        try:
            known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        except MlflowException:
            known = []
        raise ModelUnavailable(f"{name} has no version {version} (registered: "
                               f"{', '.join(map(str, known)) or 'none'}); pass one of them to --version") from None
    return str(mv.version), (mv.tags or {}).get("crossmodal.run_id") or mv.run_id


def load_registered(name: str, version: str | int | None = None) -> RegisteredModel:
    """The registered version (default: the champion) as a FusedModel, loaded from its pyfunc's model folder."""
    import mlflow
    from crossmodal.serving.fused_model import FusedModel

    version, run_id = resolve_version(name, version)
    with tempfile.TemporaryDirectory(prefix="crossmodal-predict-") as tmp:
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}/{FUSED_MODEL_ARTIFACT}",
                                                          dst_path=tmp))
        spec = json.loads((folder / MODEL_FILE).read_text())
        model = FusedModel.load(folder)  # reads every weight into memory: the folder may go
    return RegisteredModel(name, version, run_id, model, spec)


def _attribution(model, img: np.ndarray, txt: np.ndarray, proba: np.ndarray) -> dict[str, np.ndarray]:
    """``FusedModel.explain`` on features already embedded (the same definition: the drop of the predicted
    class's probability without that modality), so attribution costs no second encoding."""
    from crossmodal.heads.inference import predict_gates, without

    rows, pred = np.arange(len(proba)), proba.argmax(axis=1)
    out = {"attr_image": proba[rows, pred] - model.proba_from_features(without(img), txt)[rows, pred],
           "attr_text": proba[rows, pred] - model.proba_from_features(img, without(txt))[rows, pred]}
    gates = predict_gates(model.head, img, txt)
    if gates is not None:
        out["gate_image"], out["gate_text"] = gates[:, 0], gates[:, 1]
    return out


def _embed(extractor, images: list, texts: list) -> tuple[np.ndarray, np.ndarray]:
    """Frozen embeddings (NaN rows where absent) with a FeatureExtractor: a fine-tuned model's drift features."""
    from crossmodal.data.images import ImageError

    n = len(images)
    img = np.full((n, extractor.image_dim), np.nan, dtype=np.float32)
    txt = np.full((n, extractor.text_dim), np.nan, dtype=np.float32)
    has_image = [k for k in range(n) if images[k] is not None]
    has_text = [k for k in range(n) if texts[k] is not None]
    try:
        if has_image:
            img[has_image] = extractor.embed_images([images[k] for k in has_image])
    except ImageError as err:
        raise PredictionInputError(str(err)) from None
    if has_text:
        txt[has_text] = extractor.embed_texts([texts[k] for k in has_text])
    return img, txt


Scored = tuple[np.ndarray, dict[str, np.ndarray], np.ndarray | None, np.ndarray | None]


def scorer(registered: RegisteredModel, attribution: bool, drift: bool) -> Callable[[list, list], Scored]:
    """``score(images, texts) -> (proba, attribution columns, image embeddings, text embeddings)``; the embeddings
    are None when ``drift`` is off. Images are bytes (or None), texts cleaned strings (or None)."""
    from crossmodal.serving.fused_model import CnnRnnFusedModel, EnsembleFusedModel, FinetunedFusedModel

    model = registered.model
    # Word pieces (and pixels) in, not only text embeddings: they embed for drift besides
    if isinstance(model, (CnnRnnFusedModel, EnsembleFusedModel)):
        return lambda images, texts: model.score(images, texts, attribution, embeddings=drift)
    if not isinstance(model, FinetunedFusedModel):
        def score(images: list, texts: list) -> Scored:
            img, txt = model.features(images, texts)
            proba = model.proba_from_features(img, txt)
            return proba, _attribution(model, img, txt, proba) if attribution else {}, img, txt

        return score
    extractor = None
    if drift:
        from crossmodal.config import EncodersConfig
        from crossmodal.features.extractor import FeatureExtractor

        extractor = FeatureExtractor(EncodersConfig.model_validate(registered.spec["encoders"]),
                                     max_pixels=registered.spec.get("max_image_pixels"))

    def score_finetuned(images: list, texts: list) -> Scored:
        result = model.explain(images, texts) if attribution else {"proba": model.predict_proba(images, texts)}
        img, txt = _embed(extractor, images, texts) if extractor is not None else (None, None)
        return result.pop("proba"), result, img, txt

    return score_finetuned


def attribution_columns(model) -> list[str]:
    return ["attr_image", "attr_text"] + (["gate_image", "gate_text"] if model.has_gates else [])


# ----------------------------------------------------------------------------- rows
def _text_reason(value: object, vcfg: ValidationConfig) -> str | None:
    """What the training suite says of a text cell (``crossmodal.validation.expectations``), None when it passes."""
    if text_absent(value):
        if vcfg.allow_missing in ("text", "either"):
            return None
        if value is None or value != value:
            return "text is missing"
        return "text is empty (nothing left after removing whitespace and invisible characters)"
    n = len(clean_text(value))
    if n < vcfg.min_text_chars:
        return f"text is too short ({n} characters, minimum {vcfg.min_text_chars})"
    if n > vcfg.max_text_chars:
        return f"text is too long ({n} characters, maximum {vcfg.max_text_chars}: validation.max_text_chars)"
    return None


def row_reasons(chunk: pd.DataFrame, root: Path, vcfg: ValidationConfig,
                first_row: dict[str, int]) -> tuple[list[str | None], list[str | None]]:
    """(reason or None, resolved image path or None) per row of a canonical chunk; ``first_row`` (id -> _row of its
    first appearance) carries the duplicate-id check across chunks."""
    checks = check_rows(chunk, root, vcfg)
    reasons: list[str | None] = []
    for i, (rid, text, row) in enumerate(zip(chunk["id"].tolist(), chunk["text"].tolist(),
                                             chunk["_row"].tolist())):
        reason = checks.reasons[i][1] if checks.reasons[i] is not None else None
        first = first_row.setdefault(rid, row) if rid is not None else None
        if reason is None and rid is None:
            reason = "id is missing"
        if reason is None:
            reason = _text_reason(text, vcfg)
        if reason is None and first != row:
            reason = f"duplicate id {rid!r} (first at row {first})"
        reasons.append(reason)
    return reasons, checks.paths


# ----------------------------------------------------------------------------- the manifest
def read_rows(manifest: Path, columns: Columns) -> tuple[pd.DataFrame, bool]:
    """The canonical frame (``read_manifest``) and whether the manifest has a label column (optional here)."""
    try:
        return read_manifest(manifest, columns), True
    except DataError as err:
        try:
            available = manifest_columns(manifest)
        except DataError:  # the file itself is the problem: read_manifest's error says what it is
            raise err from None
        if columns.label in available:
            raise
        missing = [f"{role} (column {getattr(columns, role)!r})" for role in ("image", "text")
                   if getattr(columns, role) not in available]
        if missing:  # read_manifest would also name the label, which prediction does not need
            raise DataError(f"manifest {manifest} lacks column(s) {', '.join(missing)}. Available columns: "
                            f"{available}. Map them with --image-column / --text-column (data.columns).") from None
    # read_manifest insists on a label column, prediction needs none: the label role borrows the image column
    # for the read and is emptied after it.
    frame = read_manifest(manifest, columns.model_copy(update={"label": columns.image}))
    frame["label"] = None
    return frame, False


def _unique(name: str, taken: set[str]) -> str:
    while name in taken:
        name = f"{name}_"
    return name


def _original_rows(path: Path, source: dict[str, Any], rows: list[int]) -> pd.DataFrame:
    """Rows ``rows`` (``_row`` numbers) of the manifest with every original column, read as ``read_manifest``
    reads it (same separator, encoding and missing-value rules)."""
    fmt = source.get("format")
    if fmt == "csv":
        frame = pd.read_csv(path, sep=source.get("delimiter") or ",", encoding="utf-8-sig",
                            encoding_errors="surrogateescape", dtype=object, keep_default_na=False, na_values=[""])
        return frame.iloc[rows].reset_index(drop=True)
    if fmt == "parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path).take(rows)
        return pd.DataFrame({n: pd.Series(table.column(n).to_pylist(), dtype=object) for n in table.column_names})
    wanted, records, k = set(rows), {}, 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.decode("utf-8", errors="surrogateescape")
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue  # as read_manifest: a blank line is no row
            if k in wanted:
                obj = json.loads(line)
                records[k] = {c: json.dumps(v, ensure_ascii=False) if isinstance(v, list | dict) else v
                              for c, v in obj.items()}
            k += 1
    return pd.DataFrame.from_records([records[r] for r in rows], columns=source.get("columns"))


def write_refused(path: Path, manifest: Path, source: dict[str, Any], refused: list[tuple[int, str]]) -> Path:
    """The refused rows, in manifest order: ``_row``, every original column, ``reason`` (a header when none)."""
    original = list(source.get("columns") or [])
    row_col = _unique("_row", set(original))
    reason_col = _unique("reason", set(original) | {row_col})
    refused = sorted(refused)
    rows = [r for r, _ in refused]
    frame = _original_rows(manifest, source, rows) if rows else pd.DataFrame(columns=original)
    frame = frame.reindex(columns=original)
    frame.insert(0, row_col, rows)
    frame[reason_col] = [why for _, why in refused]
    with atomic_path(path) as tmp:
        # Raw bytes that were not UTF-8 are written back as \udcXX escapes: readable, and the file stays UTF-8.
        frame.to_csv(tmp, index=False, encoding="utf-8", errors="backslashreplace")
    return path


# ----------------------------------------------------------------------------- drift
class Reservoir:
    """A uniform random sample of at most ``capacity`` rows of a stream (Vitter's algorithm R), seeded; rows with
    a NaN (an absent modality) are skipped. ``seen``: the rows offered that had the modality."""

    def __init__(self, capacity: int, rng: np.random.Generator):
        self.capacity, self.rng = capacity, rng
        self.rows: np.ndarray | None = None
        self.size = self.seen = 0

    def add(self, block: np.ndarray) -> None:
        block = block[~np.isnan(block).any(axis=1)]
        if not len(block):
            return
        if self.rows is None:
            self.rows = np.empty((self.capacity, block.shape[1]), dtype=np.float32)
        fill = min(self.capacity - self.size, len(block))
        self.rows[self.size : self.size + fill] = block[:fill]
        self.size += fill
        rest = block[fill:]
        if len(rest):
            # Row t of the stream (0-based) replaces a random slot with probability capacity / (t + 1).
            slots = self.rng.integers(0, self.seen + fill + np.arange(len(rest)) + 1)
            for row, slot in zip(rest, slots):
                if slot < self.capacity:
                    self.rows[slot] = row
        self.seen += len(block)

    def sample(self, dim: int) -> np.ndarray:
        return self.rows[: self.size] if self.rows is not None else np.empty((0, dim), dtype=np.float32)


def drift_report(reference: DriftReference | None, samples: dict[str, Reservoir] | None, predicted: Counter,
                 cfg: Config, reason: str | None = None) -> dict[str, Any]:
    """``{"image", "text", "labels"}`` test results against ``reference`` (None entries and a ``reason`` without)."""
    if reference is None or samples is None:
        return {"image": None, "text": None, "labels": None, "reason": reason or "no drift reference"}
    d = cfg.drift
    out: dict[str, Any] = {}
    calibrated = reference.heldout_units is not None and len(reference.heldout_units) >= 4
    for kind in ("image", "text"):
        ref = getattr(reference, kind)
        batch = samples[kind].sample(ref.shape[1])
        if calibrated:  # new rows compared with how the model's own unseen rows looked (see evaluation.drift)
            result = heldout_mmd_test(ref, getattr(reference, f"heldout_{kind}"), reference.heldout_units, batch,
                                      alpha=d.alpha, resamples=d.permutations, max_rows=d.max_rows, seed=d.seed)
        else:
            result = mmd_test(ref, batch, alpha=d.alpha, permutations=d.permutations, max_rows=d.max_rows,
                              seed=d.seed)
        result["n"] = samples[kind].seen  # every batch row with this modality; the test saw a sample of them
        out[kind] = result
    have_predicted = calibrated and reference.heldout_predicted is not None and all(reference.heldout_predicted)
    if have_predicted:
        out["labels"] = label_shift_test(predicted, reference.heldout_predicted, reference.heldout_units,
                                         alpha=d.alpha, resamples=d.permutations, seed=d.seed)
    else:
        out["labels"] = label_test(predicted, reference.label_counts, alpha=d.alpha, permutations=d.permutations,
                                   seed=d.seed)
    out["reference"] = {"rows": int(reference.meta.get("rows", len(reference.ids))),
                        "train_rows": reference.meta.get("train_rows")}
    return out


def _reference_for(registered: RegisteredModel) -> tuple[DriftReference | None, str | None]:
    from crossmodal.registry.drift_artifact import fetch_drift_reference

    reference = fetch_drift_reference(registered.run_id)
    if reference is None:
        return None, (f"version {registered.version} of {registered.name} has no drift reference (logged before "
                      "drift references existed); register a model again to get one")
    model_space = embedding_space(registered.spec["encoders"])
    if reference.space != model_space:
        return None, (f"the drift reference was embedded with {reference.space}, the model embeds with "
                      f"{model_space}: not comparable")
    return reference, None


# ----------------------------------------------------------------------------- metrics
def label_metrics(truth: list[str], predicted: list[str]) -> dict[str, Any]:
    """Accuracy and macro-F1 (over every class in either list) of the rows that had a label."""
    from sklearn.metrics import accuracy_score, f1_score

    if not truth:
        return {"rows": 0, "accuracy": None, "macro_f1": None}
    return {"rows": len(truth), "accuracy": float(accuracy_score(truth, predicted)),
            "macro_f1": float(f1_score(truth, predicted, average="macro", zero_division=0))}


# ----------------------------------------------------------------------------- MLflow
def _flat_metrics(summary: dict[str, Any]) -> dict[str, float]:
    rows = summary["rows"]
    out = {"rows_in": rows["in"], "rows_predicted": rows["predicted"], "rows_refused": rows["refused"]}
    for kind in ("image", "text", "labels"):
        result = summary["drift"].get(kind)
        if not result:
            continue
        for key in ("statistic", "p_value", "n"):
            if result.get(key) is not None:
                out[f"drift_{kind}_{key}"] = result[key]
        out[f"drift_{kind}_drifted"] = int(bool(result["drifted"]))
    for key in ("accuracy", "macro_f1"):
        value = (summary.get("metrics") or {}).get(key)
        if value is not None:
            out[key] = value
    return {k: float(v) for k, v in out.items()}


def drifted_kinds(drift: dict[str, Any]) -> list[str]:
    return [k for k in ("image", "text", "labels") if (drift.get(k) or {}).get("drifted")]


def log_predict_run(cfg: Config, summary: dict[str, Any], summary_path: Path) -> dict[str, str]:
    """One run in ``<experiment>-predictions``: tags, metrics, the summary file; returns its ids and writes them
    into the summary file first."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    from crossmodal.registry import tracking

    experiment = f"{cfg.mlflow.experiment}{PREDICTIONS_EXPERIMENT_SUFFIX}"
    experiment_id = tracking.ensure_experiment(cfg.mlflow.model_copy(update={"experiment": experiment}))
    client = MlflowClient()
    model = summary["model"]
    drifted = drifted_kinds(summary["drift"])
    tags = {KIND_TAG: KIND, "crossmodal.model_name": model["name"], "crossmodal.model_version": model["version"],
            "crossmodal.head": model.get("head") or "", "crossmodal.manifest": tracking.redact_uri(summary["manifest"]),
            "crossmodal.drifted": ",".join(drifted) or "none"}
    run = client.create_run(experiment_id, run_name=f"predict-{Path(summary['manifest']).stem}-v{model['version']}",
                            tags=tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        params = {f"drift.{k}": v for k, v in cfg.drift.model_dump().items()}
        params.update(chunk_rows=summary["chunk_rows"], attribution=summary["attribution"])
        client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in _flat_metrics(summary).items()],
                         params=[Param(k, str(v)) for k, v in params.items()])
        summary["mlflow"] = {"experiment_id": experiment_id, "run_id": run_id}
        write_json(summary_path, summary, default=str)
        client.log_artifact(run_id, str(summary_path))
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id)
    return summary["mlflow"]


# ----------------------------------------------------------------------------- the command
def predict_manifest(cfg: Config, manifest: str | Path, out: str | Path, *, summary_path: str | Path | None = None,
                     refused_path: str | Path | None = None, model_name: str | None = None,
                     version: str | int | None = None, attribution: bool = False, chunk_rows: int = CHUNK_ROWS,
                     progress: bool = True) -> dict[str, Any]:
    """Predict every acceptable row of ``manifest`` into ``out`` (parquet) with a registered model; see the module
    docstring for what is written and the summary returned."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm.auto import tqdm

    from crossmodal.registry import tracking

    if chunk_rows < 1:
        raise DataError(f"chunk_rows must be at least 1, got {chunk_rows}")
    manifest, out = Path(manifest), Path(out)
    summary_path = Path(summary_path) if summary_path else out.parent / PREDICT_SUMMARY_FILE
    refused_path = Path(refused_path) if refused_path else out.parent / REFUSED_FILE
    name = model_name or cfg.mlflow.model_name
    vcfg = cfg.validation
    frame, has_labels = read_rows(manifest, cfg.data.columns)
    root = Path(cfg.data.data_root) if cfg.data.data_root else manifest.parent
    if not root.is_dir():
        raise DataError(f"data root {root} is not a directory; pass --data-root with the folder that holds the "
                        "images (relative image paths are resolved against it)")

    uri = tracking.ensure_store(cfg.mlflow)
    try:
        registered = load_registered(name, version)
        reference, no_reference = _reference_for(registered)
    except Exception as err:
        if tracking.is_unreachable(err):
            raise TrackingUnavailable(f"MLflow tracking server {tracking.redact_uri(uri)} is unreachable; start it "
                                      "or fix mlflow.tracking_uri / MLFLOW_TRACKING_URI") from None
        raise
    model = registered.model
    labels = list(model.labels)
    extra = attribution_columns(model) if attribution else []
    score = scorer(registered, attribution, drift=reference is not None)
    rng = np.random.default_rng(cfg.drift.seed)
    samples = {k: Reservoir(cfg.drift.max_rows, rng) for k in ("image", "text")} if reference is not None else None
    predicted_counts: Counter = Counter()
    truth, guessed = [], []
    refused: list[tuple[int, str]] = []
    first_row: dict[str, int] = {}
    n_in, n_predicted = len(frame), 0
    schema = pa.schema([("id", pa.string()), ("label", pa.string())]
                       + [(f"prob_{c}", pa.float64()) for c in labels] + [(c, pa.float64()) for c in extra])

    with atomic_path(out) as tmp:
        writer = pq.ParquetWriter(str(tmp), schema)
        try:
            bar = tqdm(total=n_in, unit="row", desc="predict", disable=not progress, file=sys.stderr,
                       dynamic_ncols=True)
            for start in range(0, n_in, chunk_rows):
                chunk = frame.iloc[start : start + chunk_rows].reset_index(drop=True)
                reasons, paths = row_reasons(chunk, root, vcfg, first_row)
                keep, images, texts = [], [], []
                for i, reason in enumerate(reasons):
                    if reason is None and paths[i] is not None:
                        try:
                            image = Path(paths[i]).read_bytes()
                        except OSError as err:  # checked a moment ago: the file went or changed meanwhile
                            reason = f"image file {chunk.at[i, 'image']!r} cannot be read: {err.strerror or err}"
                    else:
                        image = None
                    if reason is not None:
                        refused.append((int(chunk.at[i, "_row"]), reason))
                        continue
                    keep.append(i)
                    images.append(image)
                    texts.append(None if text_absent(chunk.at[i, "text"]) else clean_text(chunk.at[i, "text"]))
                proba, columns, img, txt, failed = _score_chunk(score, images, texts)
                for k, why in failed.items():
                    refused.append((int(chunk.at[keep[k], "_row"]), why))
                keep = [i for k, i in enumerate(keep) if k not in failed]
                if keep:
                    pred = [labels[k] for k in proba.argmax(axis=1)]
                    table = {"id": [str(chunk.at[i, "id"]) for i in keep], "label": pred}
                    table.update({f"prob_{c}": proba[:, k].astype("float64") for k, c in enumerate(labels)})
                    table.update({c: np.asarray(columns[c], dtype="float64") for c in extra})
                    writer.write_table(pa.Table.from_pydict(table, schema=schema))
                    predicted_counts.update(pred)
                    n_predicted += len(keep)
                    if samples is not None:
                        samples["image"].add(img)
                        samples["text"].add(txt)
                    if has_labels:
                        for i, p in zip(keep, pred):
                            label = chunk.at[i, "label"]
                            label = normalize_label(label, vcfg.normalize_labels) if isinstance(label, str) else None
                            if label is not None:
                                truth.append(label)
                                guessed.append(p)
                bar.update(len(chunk))
            bar.close()
        finally:
            writer.close()
    assert n_in == n_predicted + len(refused), (n_in, n_predicted, len(refused))
    write_refused(refused_path, manifest, frame.attrs.get("source", {}), refused)

    summary: dict[str, Any] = {
        "rows": {"in": n_in, "predicted": n_predicted, "refused": len(refused),
                 "refused_file": str(refused_path.resolve())},
        "model": {"name": registered.name, "version": registered.version, "head": registered.spec.get("head"),
                  "run_id": registered.run_id},
        "manifest": str(manifest.resolve()), "output": str(out.resolve()), "summary_file": str(summary_path.resolve()),
        "drift": drift_report(reference, samples, predicted_counts, cfg, no_reference),
        "chunk_rows": chunk_rows, "attribution": bool(attribution),
    }
    if has_labels:
        summary["metrics"] = label_metrics(truth, guessed)
    write_json(summary_path, summary, default=str)
    log_predict_run(cfg, summary, summary_path)
    return summary


def _score_chunk(score: Callable[[list, list], Scored], images: list, texts: list):
    """Score a chunk; if the model refuses it, row by row, so one bad row is refused, not its chunk.

    Returns (proba, attribution columns, image embeddings, text embeddings, {position: reason}) for the rows that
    scored, in order."""
    if not images:
        return np.zeros((0, 0)), {}, None, None, {}
    try:
        return (*score(images, texts), {})
    except PredictionInputError:
        pass  # the row-by-row pass below finds the row and names its reason
    parts, failed = [], {}
    for k in range(len(images)):
        try:
            parts.append(score([images[k]], [texts[k]]))
        except PredictionInputError as err:
            failed[k] = _ROW_PREFIX.sub("", str(err))
    if not parts:
        return np.zeros((0, 0)), {}, None, None, failed
    proba = np.concatenate([p[0] for p in parts])
    columns = {c: np.concatenate([p[1][c] for p in parts]) for c in parts[0][1]}
    img = np.concatenate([p[2] for p in parts]) if parts[0][2] is not None else None
    txt = np.concatenate([p[3] for p in parts]) if parts[0][3] is not None else None
    return proba, columns, img, txt, failed


def render(summary: dict[str, Any]) -> str:
    """The terminal report: rows, model, output, drift (and metrics when labelled)."""
    rows, model = summary["rows"], summary["model"]
    lines = [f"rows: {rows['in']} in = {rows['predicted']} predicted + {rows['refused']} refused"
             + (f" (see {rows['refused_file']})" if rows["refused"] else ""),
             f"model: {model['name']} version {model['version']}" + (f" ({model['head']})" if model.get("head") else ""),
             f"output: {summary['output']}"]
    drift = summary["drift"]
    if drift.get("image") is None:
        lines.append(f"drift: not checked ({drift.get('reason')})")
    else:
        parts = []
        for kind in ("image", "text", "labels"):
            r = drift[kind]
            if r["p_value"] is None:
                parts.append(f"{kind} not tested ({r.get('reason')})")
            else:
                stat = {"mmd-rbf": "MMD2", "mmd-vs-heldout": "MMD2", "label-mix-vs-heldout": "TV"}.get(
                    r.get("method"), "chi2")
                parts.append(f"{kind} {stat}={r['statistic']:.3g} p={r['p_value']:.3g} "
                             f"{'DRIFTED' if r['drifted'] else 'ok'} (n={r['n']})")
        lines.append(f"drift (alpha {drift['image']['alpha']}): " + ", ".join(parts))
    metrics = summary.get("metrics")
    if metrics and metrics.get("rows"):
        lines.append(f"labelled rows: {metrics['rows']}, accuracy {metrics['accuracy']:.3f}, "
                     f"macro-F1 {metrics['macro_f1']:.3f}")
    if summary.get("mlflow"):
        lines.append(f"mlflow: run {summary['mlflow']['run_id']} (experiment {summary['mlflow']['experiment_id']})")
    lines.append(f"summary: {summary['summary_file']}")
    return "\n".join(lines)
