"""The champion/challenger gate and manual promotion, with MLflow registry aliases (not stages).

    from crossmodal.registry.promotion import promote, register_and_gate, rollback
    version, decision = register_and_gate(model_uri, cfg.mlflow.model_name, test_rows, cfg.promotion, tracking_uri,
                                          run_id=run_id, fingerprint=fingerprint, reuse_identical=True,
                                          learned_ids=frame.loc[frame["split"] != "test", "id"])
    decision.promoted, decision.reason, decision.ci_low
    promote(cfg.mlflow.model_name, 3, reason="fixes the night-time photos")   # by hand: champion -> version 3
    rollback(cfg.mlflow.model_name)                                           # champion -> the one before

A new version gets alias ``challenger``. It becomes ``champion`` when there is none, or when it is better on rows
neither model learned from, by an interval rather than a point estimate:

1. Each version records the ids of the rows it learned from (its run's train and validation rows:
   ``crossmodal.registry.learned_ids``). Of the current run's test rows, only those that neither the champion nor
   the challenger learned from are compared. A model whose learned rows are not recorded (registered by an older
   release) cannot be compared soundly: the gate refuses and says so.
2. Fewer than ``promotion.min_rows`` such rows: refused, with the count in the reason.
3. Both versions are scored on those rows through their registered pyfunc models (which also proves the new model
   loads and predicts from raw inputs; an absent image or text is sent as absent), and
   ``crossmodal.evaluation.comparison`` gives the challenger-minus-champion difference of ``promotion.metric`` with
   a seeded paired bootstrap interval (``promotion.bootstrap_resamples``, ``promotion.confidence``,
   ``promotion.seed``) and an exact McNemar p-value on per-row correctness. Promoted when the interval's low end
   is above ``promotion.min_improvement``.

The decision is recorded as tags (``crossmodal.gate.*``) and metrics (``gate_delta``, ``gate_ci_low``,
``gate_ci_high``, ``gate_p_value``, ``gate_n_rows``) on the run and as tags on the version; every move of
``champion`` (the gate's, :func:`promote`'s, :func:`rollback`'s) is appended to the registered model's history
(``crossmodal.registry.history``), which :func:`rollback` replays.

Crash safety: :func:`register_and_gate` holds one lock for register + score + alias moves, so concurrent runs are
gated one after the other, and writes in this order: the version is registered with ``crossmodal.state=pending``,
the decision is tagged and the state set to ``decided``, then ``challenger`` and (if it won) ``champion`` move and
the state becomes ``complete``. The next gate's :func:`recover` deletes a pending version (its run is marked FAILED)
and finishes a decided one's alias moves, so aliases only ever point at decided versions. :func:`promote` and
:func:`rollback` take the same lock and recover first. With ``reuse_identical``, a model whose fingerprint
(``crossmodal.fingerprint``) matches a complete version is not registered again, checked under the lock so that
two identical runs finishing together register one version.

The lock is a file lock next to a SQLite or file store, so it holds across processes on one machine; for a remote
tracking server it is keyed by the URI in the temporary folder and serialises one machine's runs only (several
machines need one scheduler, e.g. a Prefect work pool with concurrency 1).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from crossmodal.config import PromotionConfig
from crossmodal.errors import PromotionError
from crossmodal.registry.history import append_entry, check_reason, read_history, rollback_target
from crossmodal.registry.learned_ids import (
    LEARNED_IDS_TAG,
    RUN_ID_TAG,
    content_keys,
    learned_ids_digest,
    log_learned_ids,
    normalise_ids,
    version_learned_ids,
)

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
STATE_TAG = "crossmodal.state"  # pending -> decided -> complete (see the module docstring)
GATE_TAG = "crossmodal.gate."  # prefix of the decision's tags on the run and the version
PROMOTED_TAG = f"{GATE_TAG}promoted"
FINGERPRINT_TAG = "crossmodal.fingerprint"  # what the registered model is made of (crossmodal.registry.publish)
UNCHANGED_TAG = "crossmodal.unchanged_since_version"  # on a run whose model was already registered
TEST = "paired_bootstrap"
# The decision's figures, also logged as run metrics gate_<name> so runs can be charted and compared in the UI.
GATE_METRICS = ("delta", "ci_low", "ci_high", "p_value", "n_rows")
SCORE_CHUNK = 512  # rows whose image bytes are read and predicted at a time: memory stays bounded


@dataclass
class GateDecision:
    promoted: bool
    reason: str
    metric: str
    challenger_version: str
    challenger_score: float | None  # on the rows compared (all test rows when there is no champion)
    champion_version: str | None  # champion before the decision
    champion_score: float | None
    delta: float | None  # challenger minus champion on the rows compared
    unchanged: bool = False  # the model was already registered as challenger_version: nothing registered or gated
    test: str | None = None  # "paired_bootstrap" when the two were compared
    n_rows: int | None = None  # rows scored: unseen by both when compared
    ci_low: float | None = None  # the delta's paired bootstrap interval
    ci_high: float | None = None
    p_value: float | None = None  # exact McNemar test on per-row correctness
    confidence: float | None = None

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
        run_id = (mv.tags or {}).get(RUN_ID_TAG) or mv.run_id
        if run_id:
            tag = _client().get_run(run_id).data.tags.get(f"{GATE_TAG}challenger_score")
            score = float(tag) if tag else None
    except Exception:  # the score is informative only
        pass
    return GateDecision(False, f"unchanged since version {version} of {model_name}: nothing registered",
                        metric, version, score, current_champion(model_name), None, None, unchanged=True)


def _present(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def model_input(rows: pd.DataFrame) -> pd.DataFrame:
    """The pyfunc input for validated rows: image bytes (a model refuses paths unless it was logged with
    ``serving.allowed_image_root``) and text, None where the row has no image or no text (``--allow-missing``).
    A column no row has is left out: the model then predicts from the other one."""
    images = [Path(p).read_bytes() if _present(p) else None for p in rows["image"]]
    texts = [t if _present(t) else None for t in rows["text"]]
    columns = {"image_bytes": images, "text": texts}
    present = {k: v for k, v in columns.items() if any(x is not None for x in v)}
    return pd.DataFrame(present or columns)


def score_version(model_name: str, version: str, rows: pd.DataFrame) -> tuple[list[str], np.ndarray]:
    """A registered version's labels and class probabilities (N, C) on ``rows`` (columns image, text), predicted
    through its pyfunc model."""
    import mlflow

    model = mlflow.pyfunc.load_model(f"models:/{model_name}/{version}")
    out = pd.concat([model.predict(model_input(rows.iloc[s : s + SCORE_CHUNK]))
                     for s in range(0, max(len(rows), 1), SCORE_CHUNK)], ignore_index=True)
    labels = [c[len("prob_"):] for c in out.columns if c.startswith("prob_")]
    return labels, out[[f"prob_{c}" for c in labels]].to_numpy(dtype="float64")


def _metric(rows: pd.DataFrame, labels: list[str], proba: np.ndarray, metric: str) -> float | None:
    from crossmodal.evaluation.metrics import compute_metrics

    if not len(rows) or not set(rows["label"]).issubset(labels):
        return None
    index = {c: k for k, c in enumerate(labels)}
    value = compute_metrics(np.array([index[v] for v in rows["label"]]), proba, labels).get(metric)
    return None if value is None else float(value)


def unseen_rows(test_rows: pd.DataFrame, *learned: Iterable[str]) -> pd.Series:
    """Boolean mask of the ``test_rows`` whose id and content key are in none of the ``learned`` sets."""
    if "id" not in test_rows.columns:
        raise PromotionError("the test rows have no 'id' column: the gate compares models only on rows neither "
                             "learned from, found by id; pass validated rows (crossmodal validate)")
    seen: set[str] = set()
    for ids in learned:
        seen.update(ids)
    unseen = ~test_rows["id"].astype(str).isin(seen)
    content = content_keys(test_rows)
    return unseen & ~content.isin(seen) if len(content) else unseen


def _points(value: float) -> str:
    return f"{value * 100:+.1f}"


def _p(value: float) -> str:
    return "p < 0.001" if value < 0.001 else f"p = {value:.3f}" if value < 0.01 else f"p = {value:.2f}"


def _by_hand(version: str) -> str:
    return f"crossmodal promote --version {version} --reason ... moves it by hand"


def compare(model_name: str, version: str, champion: str, rows: pd.DataFrame, labels: list[str],
            proba: np.ndarray, cfg: PromotionConfig) -> GateDecision:
    """Challenger ``version`` (its ``labels`` and ``proba`` on ``rows``) against ``champion`` on ``rows``."""
    from crossmodal.evaluation.comparison import mcnemar_exact, paired_bootstrap

    def refused(reason: str, **figures) -> GateDecision:
        return GateDecision(False, reason, cfg.metric, version, figures.pop("challenger_score", None), champion,
                            figures.pop("champion_score", None), None, n_rows=int(len(rows)),
                            confidence=cfg.confidence, **figures)

    champion_labels, champion_proba = score_version(model_name, champion, rows)
    if set(champion_labels) != set(labels) or not set(rows["label"]).issubset(labels):
        return refused(f"champion v{champion} predicts labels {sorted(champion_labels)}, challenger v{version} "
                       f"{sorted(labels)} and the test rows hold {sorted(set(rows['label']))}: not comparable; "
                       f"{_by_hand(version)}")
    champion_proba = champion_proba[:, [champion_labels.index(c) for c in labels]]  # the challenger's column order
    index = {c: k for k, c in enumerate(labels)}
    y = np.array([index[v] for v in rows["label"]])
    stats = paired_bootstrap(y, champion_proba, proba, labels, cfg.metric, cfg.bootstrap_resamples,
                             cfg.confidence, cfg.seed)
    p_value = mcnemar_exact(champion_proba.argmax(axis=1) == y, proba.argmax(axis=1) == y)
    if stats["delta"] is None or stats["ci_low"] is None:
        return refused(f"{cfg.metric} is undefined on the {len(rows):,} rows unseen by both champion v{champion} "
                       f"and challenger v{version} (a class is absent from them): not comparable; "
                       f"{_by_hand(version)}", p_value=p_value)
    low, high, delta = stats["ci_low"], stats["ci_high"], stats["delta"]
    promoted = low > cfg.min_improvement
    if promoted:
        verdict = "significant, promoted"
    elif low > 0:
        verdict = (f"significant, but the interval's low end is not above promotion.min_improvement "
                   f"({_points(cfg.min_improvement)} points): not promoted")
    elif high < 0:
        verdict = "significantly worse: not promoted"
    else:
        verdict = "not significant: not promoted"
    reason = (f"challenger v{version} vs champion v{champion} on {cfg.metric}: {_points(delta)} points, "
              f"{cfg.confidence * 100:g} % interval {_points(low)} to {_points(high)} on {len(rows):,} rows "
              f"(McNemar {_p(p_value)}): {verdict}")
    return GateDecision(promoted, reason, cfg.metric, version, stats["score_b"], champion, stats["score_a"], delta,
                        test=TEST, n_rows=int(len(rows)), ci_low=low, ci_high=high, p_value=p_value,
                        confidence=cfg.confidence)


def gate(model_name: str, version: str, test_rows: pd.DataFrame, cfg: PromotionConfig, run_id: str | None = None,
         learned_ids: Iterable[str] | None = None) -> GateDecision:
    """Decide whether ``version`` (already registered) becomes champion, and record the decision on ``run_id``.

    ``learned_ids``: the ids ``version`` learned from (default: read from its run, see
    ``crossmodal.registry.learned_ids``). Moves no alias: :func:`register_and_gate` does that, in order, under the
    lock.
    """
    champion = current_champion(model_name)
    labels, proba = score_version(model_name, version, test_rows)  # every test row: proves the model predicts
    all_rows = {"challenger_score": _metric(test_rows, labels, proba, cfg.metric), "n_rows": int(len(test_rows)),
                "confidence": cfg.confidence}
    if champion is None:
        decision = GateDecision(True, "no champion yet", cfg.metric, version, all_rows.pop("challenger_score"),
                                None, None, None, **all_rows)
    elif champion == version:
        decision = GateDecision(False, "already champion", cfg.metric, version, all_rows.pop("challenger_score"),
                                champion, None, None, **all_rows)
    else:
        champion_ids = version_learned_ids(model_name, champion)
        challenger_ids = (frozenset(normalise_ids(learned_ids)) if learned_ids is not None
                          else version_learned_ids(model_name, version))
        unknown = [f"{role} v{v}" for role, v, ids in (("champion", champion, champion_ids),
                                                       ("challenger", version, challenger_ids)) if ids is None]
        if unknown:
            reason = (f"{' and '.join(unknown)} {'has' if len(unknown) == 1 else 'have'} no record of the rows "
                      f"{'it' if len(unknown) == 1 else 'they'} learned from (registered by an older release or "
                      f"without learned ids), so no test row can be shown unseen by both: not promoted; "
                      f"{_by_hand(version)}")
            decision = GateDecision(False, reason, cfg.metric, version, all_rows.pop("challenger_score"), champion,
                                    None, None, **all_rows)
        else:
            mask = unseen_rows(test_rows, champion_ids, challenger_ids).to_numpy()
            n = int(mask.sum())
            if n < cfg.min_rows:
                reason = (f"only {n:,} test rows are unseen by both champion v{champion} and challenger v{version} "
                          f"(promotion.min_rows: {cfg.min_rows:,}): not promoted; {_by_hand(version)}")
                decision = GateDecision(False, reason, cfg.metric, version, None, champion, None, None, n_rows=n,
                                        confidence=cfg.confidence)
            else:
                decision = compare(model_name, version, champion, test_rows[mask], labels, proba[mask], cfg)
    if run_id:
        _record_on_run(run_id, decision)
    return decision


def _record_on_run(run_id: str, decision: GateDecision) -> None:
    from mlflow.entities import Metric, RunTag

    now = int(time.time() * 1000)
    values = decision.to_dict()
    tags = [RunTag(f"{GATE_TAG}{k}", "" if v is None else str(v)) for k, v in values.items()]
    metrics = [Metric(f"gate_{k}", float(values[k]), now, 0) for k in GATE_METRICS if values[k] is not None]
    _client().log_batch(run_id, metrics=metrics, tags=tags)


def _record_on_version(model_name: str, version: str, decision: GateDecision) -> None:
    client = _client()
    for key in ("promoted", "reason", "metric", "champion_version", "test", *GATE_METRICS, "confidence"):
        value = getattr(decision, key)
        if value is not None:
            client.set_model_version_tag(model_name, version, f"{GATE_TAG}{key}", str(value))


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


def move_champion(model_name: str, version: str, action: str, reason: str) -> dict[str, Any] | None:
    """Point ``champion`` at ``version`` and append the move to the history (call under the gate lock).

    Returns the history entry; None when a gate's move is being finished again by :func:`recover` and the alias
    and its entry are already there (a run killed after both, before the version was marked complete).
    """
    check_reason(reason)  # before the alias moves: a move is never left out of the history
    previous = current_champion(model_name)
    if action == "gate" and previous == version:
        history = read_history(model_name)
        if history and history[-1]["version"] == version and history[-1]["action"] == "gate":
            return None
    _client().set_registered_model_alias(model_name, CHAMPION, version)
    return append_entry(model_name, version, previous, action, reason)


def recover(model_name: str) -> list[str]:
    """Finish or undo what a killed run left half done (call only under the gate lock). Returns what it did."""
    from mlflow.exceptions import MlflowException

    client = _client()
    versions = client.search_model_versions(f"name = '{model_name}'")  # [] for a model not registered yet
    done = []
    for mv in sorted(versions, key=lambda m: int(m.version)):
        tags = mv.tags or {}
        state = tags.get(STATE_TAG)
        if state == "pending":  # registered, never decided: nothing points at it; remove it
            client.delete_model_version(model_name, mv.version)
            run_id = tags.get(RUN_ID_TAG)
            if run_id:
                try:  # its run never got past registration, whatever status it was left in
                    if client.get_run(run_id).info.status != "FAILED":
                        client.set_terminated(run_id, status="FAILED")
                except MlflowException:
                    pass
            done.append(f"deleted version {mv.version} (its run stopped before the gate decided)")
        elif state == "decided":  # decided, aliases not all moved: finish the moves
            set_aliases(model_name, str(mv.version), tags.get(PROMOTED_TAG) == "True",
                        tags.get(f"{GATE_TAG}reason") or "decided by the gate before its run stopped")
            done.append(f"finished the alias moves of version {mv.version}")
    return done


def set_aliases(model_name: str, version: str, promoted: bool, reason: str) -> None:
    """The decided version's alias moves, ``champion`` last, then its state ``complete``."""
    client = _client()
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    if promoted:
        move_champion(model_name, version, "gate", reason)
    client.set_model_version_tag(model_name, version, STATE_TAG, "complete")


def register_and_gate(model_uri: str, model_name: str, test_rows: pd.DataFrame, cfg: PromotionConfig,
                      tracking_uri: str, run_id: str | None = None, fingerprint: str | None = None,
                      reuse_identical: bool = False, learned_ids: Iterable[str] | None = None
                      ) -> tuple[str, GateDecision]:
    """Register ``model_uri`` and run the gate, one run at a time; returns (version, decision).

    ``learned_ids``: the ids of the rows the model learned from (its run's train and validation rows); logged on
    ``run_id`` (``data/learned_ids.parquet``) and their digest tagged on the run and the version, so that this gate
    and later ones compare only on rows it never saw. Without them the version counts as having learned from rows
    nobody can name: while there is a champion, it is never promoted by a gate.

    With ``reuse_identical`` and a complete version of the same ``fingerprint`` already there, nothing is
    registered and the decision says ``unchanged`` (that version's number is returned). See the module docstring
    for the lock and the order of writes.
    """
    import mlflow

    client = _client()
    unseen_rows(test_rows.head(0))  # no id column: refused before anything is logged or registered
    learned = None if learned_ids is None else normalise_ids(learned_ids)
    if learned is not None and run_id:
        log_learned_ids(run_id, learned)  # before the lock: it holds nothing another run reads
    with gate_lock(tracking_uri, cfg.lock_timeout_s):
        started = time.time()
        for note in recover(model_name):
            log.warning("%s: %s", model_name, note)
        same = identical_version(model_name, fingerprint) if fingerprint and reuse_identical else None
        if same is not None:  # an identical run registered it while this one was logging
            if run_id:
                client.set_tag(run_id, UNCHANGED_TAG, same)
            return same, unchanged_decision(model_name, same, cfg.metric)
        tags = {RUN_ID_TAG: run_id or "", STATE_TAG: "pending"}
        if fingerprint:
            tags[FINGERPRINT_TAG] = fingerprint
        if learned is not None:
            tags[LEARNED_IDS_TAG] = learned_ids_digest(learned)
        mv = mlflow.register_model(model_uri, model_name, tags=tags)
        version = str(mv.version)
        try:
            decision = gate(model_name, version, test_rows, cfg, run_id=run_id,
                            learned_ids=None if learned is None else frozenset(learned))
            _record_on_version(model_name, version, decision)
            client.set_model_version_tag(model_name, version, STATE_TAG, "decided")
        except BaseException:
            # Still pending: undo now rather than leave it to the next run (a hard kill skips this; recover() then).
            try:
                client.delete_model_version(model_name, version)
            except Exception:  # the store itself may be what failed; recover() removes it later
                pass
            raise
        set_aliases(model_name, version, decision.promoted, decision.reason)
        if run_id:
            client.set_tag(run_id, f"{GATE_TAG}started_at", f"{started:.6f}")
            client.set_tag(run_id, f"{GATE_TAG}finished_at", f"{time.time():.6f}")
    return version, decision


def promote(model_name: str, version: str | int, reason: str = "by hand", tracking_uri: str | None = None,
            lock_timeout_s: float = 1800.0) -> str:
    """Move ``champion`` to ``version`` by hand (``crossmodal promote --version N --reason TEXT``), recorded in the
    history with ``reason``; waits for a running gate (the gate lock of ``tracking_uri``, default MLflow's)."""
    from mlflow.exceptions import MlflowException

    import mlflow

    version = str(version)
    check_reason(reason)
    with gate_lock(tracking_uri or mlflow.get_tracking_uri(), lock_timeout_s):
        recover(model_name)
        try:
            _client().get_model_version(model_name, version)
        except MlflowException as err:
            raise PromotionError(f"cannot promote {model_name} version {version}: {err.message}") from None
        move_champion(model_name, version, "promote", reason)
    return version


def rollback(model_name: str, reason: str = "rolled back by hand", tracking_uri: str | None = None,
             lock_timeout_s: float = 1800.0) -> str:
    """Move ``champion`` back to the version that held it before the current one, per the history (rolling back
    twice goes two moves back); the rollback is itself an entry of the history. Returns that version."""
    from mlflow.exceptions import MlflowException

    import mlflow

    check_reason(reason)
    with gate_lock(tracking_uri or mlflow.get_tracking_uri(), lock_timeout_s):
        recover(model_name)
        history = read_history(model_name)  # PromotionError for an unknown model
        current = current_champion(model_name)
        target = rollback_target(history, current)
        if target is None:
            moves = ", ".join(f"v{e['version']} ({e['action']})" for e in history) or "none"
            raise PromotionError(f"{model_name} has no earlier champion to roll back to (moves so far: {moves}); "
                                 "use crossmodal promote --version N")
        try:
            _client().get_model_version(model_name, target)
        except MlflowException:
            raise PromotionError(f"cannot roll {model_name} back to version {target}: that version no longer "
                                 "exists; use crossmodal promote --version N") from None
        _client().set_registered_model_alias(model_name, CHAMPION, target)
        append_entry(model_name, target, current, "rollback", reason)
    return target
