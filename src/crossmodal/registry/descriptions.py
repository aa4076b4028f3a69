"""What the MLflow UI says in words once the gate has decided: each registered version's description, the
registered model's description and the pipeline run's note (its description on the run page).

    from crossmodal.registry.descriptions import describe_registration, run_note
    describe_registration(cfg.mlflow.model_name, version, metrics, decision.to_dict(), cfg.encoders, run_id)
    run_note(metrics, version, cfg.mlflow.model_name, decision.to_dict())   # the text alone

- a version: its head, the head's test metrics and the gate's verdict with its reason;
- the registered model: what it predicts (the labels) from what (image and text) and the encoders it embeds with;
- the parent run (tag ``mlflow.note.content``): one paragraph comparing the best fusion head with the best unimodal
  one, the fusion gain, the registered head and the gate's verdict.

``metrics`` is the evaluation's ``metrics.json`` (``crossmodal.evaluation.evaluate``), ``decision`` a
``GateDecision.to_dict()``. Writing never raises: a description is a view of what the tags and metrics already hold,
and must not fail a run whose model is registered.
"""

from __future__ import annotations

import logging
from typing import Any

from crossmodal.config import EncodersConfig

log = logging.getLogger(__name__)

NOTE_TAG = "mlflow.note.content"  # MLflow's run description (mlflow.utils.mlflow_tags.MLFLOW_RUN_NOTE)
MAX_LABELS_LISTED = 30
_METRIC_NAMES = (("macro_f1", "macro-F1"), ("accuracy", "accuracy"), ("roc_auc", "ROC AUC"), ("ece", "ECE"))
_MODALITY = {"fusion": "image and text", "image": "the image alone", "text": "the text alone"}


def _score(value: Any) -> str:
    return "n/a" if value is None else f"{float(value):.3f}"


def _test(metrics: dict[str, Any], head: str | None) -> dict[str, Any]:
    return ((metrics.get("heads") or {}).get(head) or {}).get("test") or {}


def verdict(decision: dict[str, Any]) -> str:
    """The gate's decision in words: ``promoted to champion. Reason: no champion yet``, ``not promoted, version 1
    stays champion. Reason: challenger v2 vs champion v1 on macro_f1: ...``."""
    reason = decision.get("reason") or "none recorded"
    if decision.get("unchanged"):
        return f"not run. Reason: {reason}"
    if decision.get("promoted"):
        return f"promoted to champion. Reason: {reason}"
    champion = decision.get("champion_version")
    stays = f", version {champion} stays champion" if champion else ""
    return f"not promoted{stays}. Reason: {reason}"


def version_description(metrics: dict[str, Any], head: str, decision: dict[str, Any]) -> str:
    """A registered version's description: its head, the head's test metrics, the gate's verdict."""
    entry = (metrics.get("heads") or {}).get(head) or {}
    test = entry.get("test") or {}
    family = entry.get("family", "frozen")
    kind = "fine-tuned end to end" if family == "finetuned" else "on frozen encoder features"
    if family == "rnn":  # cnn_rnn: it reads word pieces, not the text encoder's pooled features
        kind = "an RNN on the text encoder's word pieces fused with an MLP on the frozen image features"
    if family == "ensemble" and entry.get("members"):
        mix = ", ".join(f"`{name}` {share:.0%}" for name, share in entry["members"].items())
        kind = f"an ensemble of {mix}, {kind}"
    scores = ", ".join(f"{label} {_score(test.get(key))}" for key, label in _METRIC_NAMES if key in test)
    rows = f" ({test['n']:,} rows)" if isinstance(test.get("n"), int) else ""
    return (f"Head `{head}`: predicts from {_MODALITY.get(entry.get('modality', 'fusion'), 'image and text')}, "
            f"{kind}.\n\nTest{rows}: {scores or 'no metrics recorded'}.\n\nGate: {verdict(decision)}.")


def model_description(labels: list[str], encoders: EncodersConfig) -> str:
    """The registered model's description: the labels it predicts and the encoders it embeds with."""
    shown = ", ".join(f"`{label}`" for label in labels[:MAX_LABELS_LISTED])
    more = f" and {len(labels) - MAX_LABELS_LISTED} more" if len(labels) > MAX_LABELS_LISTED else ""
    image, text = encoders.image, encoders.text
    return (f"Predicts one of {len(labels)} labels ({shown}{more}) from an image and its text, with a probability "
            f"per label (columns `label`, `prob_<label>`).\n\nEncoders: image `{image.name}` at {image.image_size} px, "
            f"text `{text.name}` up to {text.max_length} tokens.\n\nEach version's description gives its head, test "
            "metrics and the promotion gate's verdict; alias `champion` is the version in use.")


def run_note(metrics: dict[str, Any], version: str | None, model_name: str, decision: dict[str, Any]) -> str:
    """The pipeline run's note: best fusion vs best unimodal head, the fusion gain, what was registered, the gate."""
    fusion, unimodal = metrics.get("best_fusion"), metrics.get("best_unimodal")
    registered = metrics.get("registered_head") or metrics.get("best_head")
    f1 = {head: _score(_test(metrics, head).get("macro_f1")) for head in (fusion, unimodal) if head}
    gain = metrics.get("fusion_gain_macro_f1")
    if fusion and unimodal:
        first = (f"The best fusion head, `{fusion}`, scored a test macro-F1 of {f1[fusion]} against {f1[unimodal]} "
                 f"for the best unimodal head, `{unimodal}`"
                 + (f": a fusion gain of {gain * 100:+.1f} points." if gain is not None else "."))
    elif fusion:
        first = (f"The best fusion head, `{fusion}`, scored a test macro-F1 of {f1[fusion]} (no unimodal head to "
                 "compare with).")
    elif unimodal:
        first = (f"No fusion head was trained; the best unimodal head, `{unimodal}`, scored a test macro-F1 of "
                 f"{f1[unimodal]}.")
    else:
        first = "No head was compared."
    text = [first]
    traditional = metrics.get("best_traditional")
    if traditional:
        text.append(f"The best traditional baseline, `{traditional}`, scored "
                    f"{_score(_test(metrics, traditional).get('macro_f1'))}.")
    if decision.get("unchanged"):
        text.append(f"Nothing was registered: the model (`{registered}`) is unchanged since version {version} of "
                    f"`{model_name}`.")
    else:
        text.append(f"Registered `{registered}` as version {version} of `{model_name}`. Gate: {verdict(decision)}.")
    return " ".join(text)


def _attempt(what: str, fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - see the module docstring
        log.warning("MLflow %s not written: %s: %s", what, type(err).__name__, err)


def describe_run(run_id: str | None, metrics: dict[str, Any], version: str | None, model_name: str,
                 decision: dict[str, Any]) -> None:
    """Set the run's note (``mlflow.note.content``) to :func:`run_note`; never raises."""
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    _attempt(f"note of run {run_id}", lambda: MlflowClient().set_tag(
        run_id, NOTE_TAG, run_note(metrics, version, model_name, decision)))


def describe_registration(model_name: str, version: str, metrics: dict[str, Any], decision: dict[str, Any],
                          encoders: EncodersConfig, run_id: str | None = None) -> None:
    """Write the version's and the registered model's descriptions and the run's note; never raises. For an
    unchanged model (``decision["unchanged"]``) only the run's note: the version it matched keeps its own."""
    from mlflow.tracking import MlflowClient

    if not decision.get("unchanged"):
        head = metrics.get("registered_head") or metrics.get("best_head")
        _attempt(f"description of {model_name} version {version}", lambda: MlflowClient().update_model_version(
            model_name, version, description=version_description(metrics, head, decision)))
        _attempt(f"description of {model_name}", lambda: MlflowClient().update_registered_model(
            model_name, description=model_description(list(metrics.get("labels") or []), encoders)))
    describe_run(run_id, metrics, version, model_name, decision)
