"""The catalog of files a run writes: every name spelled once, with its format and the stage that writes it.

Paths are relative to the stage's output folder: the ``--out`` folder of a CLI stage command, or
``work/runs/<run>/<validated|models|reports>/`` for a flow run (whose features stay in the feature store under
``paths.cache``).

| constant | file | format | written by |
|---|---|---|---|
| ``VALIDATED_FILE`` | ``validated.parquet`` | kept rows: ``id, image, text, label, split, group, image_sha256, _row`` (strings; image is an absolute path) | validation |
| ``QUARANTINE_FILE`` | ``quarantine.csv`` | refused rows: ``_row, id, image, text, label, split, group, reason`` (header even when empty) | validation |
| ``VALIDATION_FILE`` | ``validation.json`` | counts, each expectation with its failing ids, warnings | validation |
| ``DATA_DOCS_DIR`` | ``data_docs/`` | Great Expectations Data Docs (``index.html``) | validation |
| ``IMAGE_FEATURES_FILE``, ``TEXT_FEATURES_FILE`` | ``image.npy``, ``text.npy`` | (N, D) float32 in validated row order; an all-NaN row is an absent modality | features |
| ``FEATURES_FILE`` | ``features.json`` | feature keys, encoders, shapes, what was computed | features |
| ``LABELS_FILE`` | ``labels.json`` | sorted label strings; class index = position | training |
| ``HEAD_FILE`` | ``<head>/head.json`` | name, modality, family, init_args, history, best_epoch, val metrics | training |
| ``WEIGHTS_FILE`` | ``<head>/weights.safetensors`` | the head's state dict (never pickle) | training |
| ``MEMBERS_DIR`` | ``ensemble/members/<head>/`` | an ensemble with members on other inputs than the frozen features (``cnn_rnn``, ``finetune_xattn``): each member's head folder, less its predictions; the weights are ``init_args["members"]`` | training |
| ``PREDICTIONS_FILE`` | ``<head>/predictions.npz`` | ``val_/test_`` ``proba`` (N, C) float32, ``y`` int64, ``ids`` str; ``test_proba_missing_text``, ``test_proba_missing_image``, ``test_gate`` | training |
| ``METRICS_FILE`` | ``metrics.json`` | per head: val, test, calibrated test, robustness, attribution; winners | evaluation |
| ``ROBUSTNESS_FILE`` | ``robustness.md`` | test macro-F1 with a modality removed, per head | evaluation |
| ``PLOTS_DIR``, ``PER_CLASS_DIR`` | ``plots/<head>_{confusion,roc,reliability}.png``, ``per_class/<head>.json`` | figures; sklearn classification report | evaluation |
| ``REPORT_FILE`` | ``report.html`` | the run's self-contained report page (data, comparison, per head, attribution, gate); also an MLflow artifact | evaluation (built at publish) |
| ``COMPARISON_FILE`` | ``comparison.txt`` | the comparison table as printed | registry (MLflow artifact) |
| ``LEARNED_IDS_FILE`` | ``learned_ids.parquet`` | the ids of the train and validation rows a registered model learned from: one string column ``id``, sorted, unique (under ``data/`` of its MLflow run) | registry (MLflow artifact) |
| ``MODEL_FILE`` | ``model.json`` | what the served model needs: head, labels, encoders, temperature, serving options | serving |
| ``STAGES_FILE`` | ``stages.json`` | per stage: cached or not, key, seconds | flows |
| ``PROGRESS_DIR`` | ``progress/<head>.jsonl`` | one JSON line per epoch of a head while it trains: ``epoch``, losses, ``val_macro_f1``, ``time`` | training |
| ``EVENTS_DIR``: ``STAGE_EVENTS``, ``EXTRACT_EVENTS`` | ``progress/pipeline/stages.jsonl``, ``progress/pipeline/extract.jsonl`` | JSON lines as they happen: ``stage``, ``state`` (started, finished, cached or failed), ``seconds``; extraction's ``kind``, ``done``, ``total`` (distinct items) | flows |
| ``ENTRY_FILE`` | ``entry.json`` | a stage-cache entry: meta and every file's size and mtime | pipeline |
| ``SUMMARY_FILE`` | ``summary.json`` | the run's summary (``paths.summary``) | registry |
| ``DRIFT_REFERENCE_FILE`` | ``drift/drift_reference.npz`` (``DRIFT_DIR``) | a seeded sample of the training rows' frozen ``image``/``text`` embeddings, ``ids``, training ``label_names``/``label_counts``, ``meta`` (JSON) | registry (MLflow artifact of the model's run) |
| ``BATCH_PREDICTIONS_FILE`` | ``predictions.parquet`` | ``id, label, prob_<class>``[, ``attr_image, attr_text``, ...] per predicted row | predict |
| ``REFUSED_FILE`` | ``refused.csv`` | refused rows: ``_row``, every original column, ``reason`` (header even when empty) | predict |
| ``PREDICT_SUMMARY_FILE`` | ``predict_summary.json`` | rows, model, output, drift[, metrics] (also an MLflow artifact) | predict |
"""

from __future__ import annotations

VALIDATED_FILE = "validated.parquet"
QUARANTINE_FILE = "quarantine.csv"
VALIDATION_FILE = "validation.json"
DATA_DOCS_DIR = "data_docs"

IMAGE_FEATURES_FILE = "image.npy"
TEXT_FEATURES_FILE = "text.npy"
FEATURES_FILE = "features.json"

LABELS_FILE = "labels.json"
HEAD_FILE = "head.json"
TASK_PARTS_DIR = ".parts"  # under the models folder while training: stacking's folds and base heads, then removed
WEIGHTS_FILE = "weights.safetensors"
MEMBERS_DIR = "members"
PREDICTIONS_FILE = "predictions.npz"

METRICS_FILE = "metrics.json"
ROBUSTNESS_FILE = "robustness.md"
PLOTS_DIR = "plots"
PER_CLASS_DIR = "per_class"
REPORT_FILE = "report.html"
COMPARISON_FILE = "comparison.txt"
LEARNED_IDS_FILE = "learned_ids.parquet"

MODEL_FILE = "model.json"
STAGES_FILE = "stages.json"
PROGRESS_DIR = "progress"
EVENTS_DIR = "pipeline"  # under PROGRESS_DIR; each holds <name>.jsonl files
STAGE_EVENTS = "stages"
EXTRACT_EVENTS = "extract"
TUNE_EVENTS = "tune"  # crossmodal tune: one line per finished trial (flows.tuning)
ENTRY_FILE = "entry.json"
SUMMARY_FILE = "summary.json"

DRIFT_DIR = "drift"
DRIFT_REFERENCE_FILE = "drift_reference.npz"
BATCH_PREDICTIONS_FILE = "predictions.parquet"
REFUSED_FILE = "refused.csv"
PREDICT_SUMMARY_FILE = "predict_summary.json"
