"""The champion/challenger gate and manual promotion, with MLflow registry aliases (not stages).

A new version is registered and gets alias ``challenger``. It becomes ``champion`` when there is none, or when it
beats the champion on the *same* held-out test rows, both scored through their registered pyfunc models (so the
comparison also proves the new model loads and predicts from raw inputs), by more than
``promotion.min_improvement`` on ``promotion.metric``. The decision, both scores and the delta are tags on the run.

Every move of ``champion`` is recorded in the registered model's tag ``crossmodal.champion_history`` so that
``crossmodal rollback`` can return to the previous champion.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd

from crossmodal.config import PromotionConfig

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "crossmodal.champion_history"


class PromotionError(RuntimeError):
    """A promotion or rollback request cannot be carried out; the message says why."""


@dataclass
class GateDecision:
    promoted: bool
    reason: str
    metric: str
    challenger_version: str
    challenger_score: float | None
    champion_version: str | None  # champion before the decision
    champion_score: float | None
    delta: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


def current_champion(model_name: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(_client().get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException:
        return None


def register(model_uri: str, model_name: str, run_id: str | None = None) -> str:
    """Register ``model_uri`` as a new version of ``model_name`` with alias ``challenger``; return the version."""
    import mlflow

    version = mlflow.register_model(model_uri, model_name, tags={"crossmodal.run_id": run_id or ""}).version
    _client().set_registered_model_alias(model_name, CHALLENGER, version)
    return str(version)


def score_version(model_name: str, version: str, rows: pd.DataFrame, metric: str) -> float | None:
    """Score a registered version on ``rows`` (columns image, text, label) through its pyfunc model.

    Returns None when the version predicts another label set than ``rows`` holds (not comparable).
    """
    import mlflow

    from crossmodal.evaluate import compute_metrics

    model = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}")
    out = model.predict(rows[["image", "text"]].reset_index(drop=True))
    labels = [c[len("prob_"):] for c in out.columns if c.startswith("prob_")]
    if not set(rows["label"]).issubset(labels):
        return None
    index = {c: k for k, c in enumerate(labels)}
    y = np.array([index[v] for v in rows["label"]])
    proba = out[[f"prob_{c}" for c in labels]].to_numpy(dtype="float64")
    value = compute_metrics(y, proba, labels).get(metric)
    return None if value is None else float(value)


def _push_history(model_name: str, version: str) -> None:
    client = _client()
    tags = client.get_registered_model(model_name).tags or {}
    history = [v for v in tags.get(HISTORY_TAG, "").split(",") if v]
    if not history or history[-1] != version:
        history.append(version)
    client.set_registered_model_tag(model_name, HISTORY_TAG, ",".join(history[-50:]))


def set_champion(model_name: str, version: str) -> None:
    client = _client()
    client.get_model_version(model_name, version)  # raises a clear MLflow error for an unknown version
    client.set_registered_model_alias(model_name, CHAMPION, version)
    _push_history(model_name, version)


def gate(model_name: str, version: str, test_rows: pd.DataFrame, cfg: PromotionConfig,
         run_id: str | None = None) -> GateDecision:
    """Decide whether ``version`` (already registered, alias challenger) becomes champion."""
    champion = current_champion(model_name)
    challenger_score = score_version(model_name, version, test_rows, cfg.metric)
    if champion is None:
        decision = GateDecision(True, "no champion yet", cfg.metric, version, challenger_score, None, None, None)
    elif champion == version:
        decision = GateDecision(False, "already champion", cfg.metric, version, challenger_score, champion,
                                challenger_score, 0.0)
    else:
        champion_score = score_version(model_name, champion, test_rows, cfg.metric)
        if champion_score is None or challenger_score is None:
            decision = GateDecision(False, f"champion v{champion} predicts another label set; not comparable "
                                    f"(promote by hand: crossmodal promote --version {version})", cfg.metric,
                                    version, challenger_score, champion, champion_score, None)
        else:
            delta = challenger_score - champion_score
            promoted = delta > cfg.min_improvement
            verb = "beats" if promoted else "does not beat"
            reason = (f"challenger v{version} {verb} champion v{champion} on {cfg.metric}: "
                      f"{challenger_score:.4f} vs {champion_score:.4f} (delta {delta:+.4f}, "
                      f"needs > {cfg.min_improvement})")
            decision = GateDecision(promoted, reason, cfg.metric, version, challenger_score, champion,
                                    champion_score, delta)
    if decision.promoted:
        set_champion(model_name, version)
    if run_id:
        client = _client()
        for key, value in decision.to_dict().items():
            client.set_tag(run_id, f"crossmodal.gate.{key}", "" if value is None else str(value))
    return decision


def promote(model_name: str, version: str | int) -> str:
    """Move ``champion`` to ``version`` by hand (``crossmodal promote --version N``)."""
    from mlflow.exceptions import MlflowException

    try:
        set_champion(model_name, str(version))
    except MlflowException as err:
        raise PromotionError(f"cannot promote {model_name} version {version}: {err.message}") from None
    return str(version)


def rollback(model_name: str) -> str:
    """Move ``champion`` back to the version that held it before the current one."""
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        tags = client.get_registered_model(model_name).tags or {}
    except MlflowException:
        raise PromotionError(f"no registered model named {model_name!r}") from None
    history = [v for v in tags.get(HISTORY_TAG, "").split(",") if v]
    if len(history) < 2:
        raise PromotionError(f"{model_name} has no earlier champion to roll back to "
                             f"(history: {history or 'empty'}); use crossmodal promote --version N")
    previous = history[-2]
    client.set_registered_model_alias(model_name, CHAMPION, previous)
    client.set_registered_model_tag(model_name, HISTORY_TAG, ",".join(history[:-1]))
    return previous
