"""The champion/challenger gate and manual promotion, with MLflow registry aliases (not stages).

    from crossmodal.registry.promotion import promote, register_and_gate, rollback
    version, decision = register_and_gate(model_uri, cfg.mlflow.model_name, test_rows, cfg.promotion, tracking_uri,
                                          run_id=run_id, fingerprint=fingerprint, reuse_identical=True)
    decision.promoted, decision.reason
    promote(cfg.mlflow.model_name, 3)             # by hand: champion -> version 3
    rollback(cfg.mlflow.model_name)               # champion -> the previous champion

A new version gets alias ``challenger`` and becomes ``champion`` when there is none, or when it beats the champion by
more than ``promotion.min_improvement`` on ``promotion.metric``, both scored through their registered pyfunc
models on the same test rows (which also proves the new model loads and predicts from raw inputs). The decision
is recorded as tags on the run and the version; every move of ``champion`` is appended to the registered model's
tag ``crossmodal.champion_history``, which ``crossmodal rollback`` reads.

Crash safety: :func:`register_and_gate` holds one lock for register + score + alias moves, so concurrent runs are
gated one after the other, and writes in this order: the version is registered with ``crossmodal.state=pending``,
the decision is tagged and the state set to ``decided``, then ``challenger`` and (if it won) ``champion`` move and
the state becomes ``complete``. The next gate's :func:`recover` deletes a pending version (its run is marked FAILED)
and finishes a decided one's alias moves, so aliases only ever point at decided versions. With
``reuse_identical``, a model whose fingerprint (``crossmodal.fingerprint``) matches a complete version is not
registered again, checked under the lock so that two identical runs finishing together register one version.

The lock is a file lock next to a SQLite or file store, so it holds across processes on one machine; for a remote
tracking server it is keyed by the URI in the temporary folder and serialises one machine's runs only (several
machines need one scheduler, e.g. a Prefect work pool with concurrency 1).
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crossmodal.config import PromotionConfig
from crossmodal.errors import PromotionError

CHAMPION, CHALLENGER = "champion", "challenger"
HISTORY_TAG = "crossmodal.champion_history"
STATE_TAG = "crossmodal.state"  # pending -> decided -> complete (see the module docstring)
PROMOTED_TAG = "crossmodal.gate.promoted"
FINGERPRINT_TAG = "crossmodal.fingerprint"  # what the registered model is made of (crossmodal.registry.publish)
UNCHANGED_TAG = "crossmodal.unchanged_since_version"  # on a run whose model was already registered


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
    unchanged: bool = False  # the model was already registered as challenger_version: nothing registered or gated

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


def identical_version(model_name: str, fingerprint: str) -> str | None:
    """The latest complete version of ``model_name`` whose fingerprint tag is ``fingerprint``, or None.

    Only complete versions count: a pending one is deleted and a decided one finished by the next gate's
    :func:`recover`, which then finds it here.
    """
    from mlflow.exceptions import MlflowException

    try:
        versions = _client().search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return None
    same = [int(mv.version) for mv in versions
            if (mv.tags or {}).get(FINGERPRINT_TAG) == fingerprint and (mv.tags or {}).get(STATE_TAG) == "complete"]
    return str(max(same)) if same else None


def unchanged_decision(model_name: str, version: str, metric: str) -> GateDecision:
    """What a run whose model is already registered as ``version`` reports: no gate, the champion stays."""
    score = None
    try:
        mv = _client().get_model_version(model_name, version)
        run_id = (mv.tags or {}).get("crossmodal.run_id") or mv.run_id
        if run_id:
            tag = _client().get_run(run_id).data.tags.get("crossmodal.gate.challenger_score")
            score = float(tag) if tag else None
    except Exception:  # the score is informative only
        pass
    return GateDecision(False, f"unchanged since version {version} of {model_name}: nothing registered",
                        metric, version, score, current_champion(model_name), None, None, unchanged=True)


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
    from crossmodal.evaluation.metrics import compute_metrics

    model = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}")
    # Bytes, not paths: a model refuses image paths unless it was logged with serving.allowed_image_root.
    images = [Path(p).read_bytes() for p in rows["image"]]
    out = model.predict(pd.DataFrame({"image_bytes": images, "text": rows["text"].tolist()}))
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
         run_id: str | None = None, move_aliases: bool = True) -> GateDecision:
    """Decide whether ``version`` (already registered) becomes champion.

    With ``move_aliases`` False only the decision is made and recorded on the run (``register_and_gate`` moves
    the aliases itself, after recording the decision on the version).
    """
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
    if decision.promoted and move_aliases:
        set_champion(model_name, version)
    if run_id:
        client = _client()
        for key, value in decision.to_dict().items():
            client.set_tag(run_id, f"crossmodal.gate.{key}", "" if value is None else str(value))
    return decision


def lock_path(tracking_uri: str) -> Path:
    """The gate's lock file for a tracking store: next to a SQLite database or file store, else in the temp dir."""
    uri = tracking_uri
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):].split("?", 1)[0])
        return db.with_name(db.name + ".gate.lock")
    if uri.startswith("file:") or "://" not in uri:
        folder = Path(uri[len("file://"):] if uri.startswith("file://") else uri.removeprefix("file:"))
        return folder / ".crossmodal-gate.lock"
    key = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"crossmodal-gate-{key}.lock"


@contextmanager
def gate_lock(tracking_uri: str, timeout_s: float):
    """Hold the store's gate lock (one gate at a time); a clear PromotionError if it stays taken ``timeout_s``."""
    from filelock import FileLock, Timeout

    path = lock_path(tracking_uri)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=timeout_s)
    except Timeout:
        raise PromotionError(f"another run has held the promotion lock {path} for over {timeout_s:.0f} s "
                             "(promotion.lock_timeout_s); if no run is active, delete the file and retry") from None
    try:
        yield path
    finally:
        lock.release()


def recover(model_name: str) -> list[str]:
    """Finish or undo what a killed run left half done (call only under the gate lock). Returns what it did."""
    from mlflow.exceptions import MlflowException

    client = _client()
    versions = client.search_model_versions(f"name = '{model_name}'")  # [] for a model not registered yet
    done = []
    for mv in sorted(versions, key=lambda m: int(m.version)):
        state = (mv.tags or {}).get(STATE_TAG)
        if state == "pending":  # registered, never decided: nothing points at it; remove it
            client.delete_model_version(model_name, mv.version)
            run_id = (mv.tags or {}).get("crossmodal.run_id")
            if run_id:
                try:  # its run never got past registration, whatever status it was left in
                    if client.get_run(run_id).info.status != "FAILED":
                        client.set_terminated(run_id, status="FAILED")
                except MlflowException:
                    pass
            done.append(f"deleted version {mv.version} (its run stopped before the gate decided)")
        elif state == "decided":  # decided, aliases not all moved: finish the moves
            set_aliases(model_name, str(mv.version), mv.tags.get(PROMOTED_TAG) == "True")
            done.append(f"finished the alias moves of version {mv.version}")
    return done


def set_aliases(model_name: str, version: str, promoted: bool) -> None:
    client = _client()
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    if promoted:
        set_champion(model_name, version)  # champion moves last
    client.set_model_version_tag(model_name, version, STATE_TAG, "complete")


def register_and_gate(model_uri: str, model_name: str, test_rows: pd.DataFrame, cfg: PromotionConfig,
                      tracking_uri: str, run_id: str | None = None, fingerprint: str | None = None,
                      reuse_identical: bool = False) -> tuple[str, GateDecision]:
    """Register ``model_uri`` and run the gate, one run at a time; returns (version, decision).

    With ``reuse_identical`` and a complete version of the same ``fingerprint`` already there, nothing is
    registered and the decision says ``unchanged`` (that version's number is returned). See the module docstring
    for the lock and the order of writes.
    """
    import mlflow

    client = _client()
    with gate_lock(tracking_uri, cfg.lock_timeout_s):
        started = time.time()
        for note in recover(model_name):
            import logging

            logging.getLogger(__name__).warning("%s: %s", model_name, note)
        same = identical_version(model_name, fingerprint) if fingerprint and reuse_identical else None
        if same is not None:  # an identical run registered it while this one was logging
            if run_id:
                client.set_tag(run_id, UNCHANGED_TAG, same)
            return same, unchanged_decision(model_name, same, cfg.metric)
        tags = {"crossmodal.run_id": run_id or "", STATE_TAG: "pending"}
        if fingerprint:
            tags[FINGERPRINT_TAG] = fingerprint
        mv = mlflow.register_model(model_uri, model_name, tags=tags)
        version = str(mv.version)
        try:
            decision = gate(model_name, version, test_rows, cfg, run_id=run_id, move_aliases=False)
            for key in ("promoted", "reason", "metric"):
                client.set_model_version_tag(model_name, version, f"crossmodal.gate.{key}",
                                             str(getattr(decision, key)))
            client.set_model_version_tag(model_name, version, STATE_TAG, "decided")
        except BaseException:
            # Still pending: undo now rather than leave it to the next run (a hard kill skips this; recover() then).
            try:
                client.delete_model_version(model_name, version)
            except Exception:  # the store itself may be what failed; recover() removes it later
                pass
            raise
        set_aliases(model_name, version, decision.promoted)
        if run_id:
            client.set_tag(run_id, "crossmodal.gate.started_at", f"{started:.6f}")
            client.set_tag(run_id, "crossmodal.gate.finished_at", f"{time.time():.6f}")
    return version, decision


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
