"""The ``ensemble`` head: an average of trained heads, chosen on their validation probabilities.

    from crossmodal.training.ensemble import choose_ensemble, select_members, within_se_members
    counts, record = within_se_members({"concat": p1, "late": p2}, y_val, groups_val)       # {"concat": 1, "late": 1}
    counts = select_members({"concat": p1, "late": p2}, y_val, rounds=30, metric="log_loss")   # {"concat": 18, ...}
    choice, history = choose_ensemble("work/models", ["concat", "late", "cnn_rnn"], data, cfg.train)
    proba = choice.pool({"concat": p1, "late": p2, "cnn_rnn": p3})                          # the ensemble's

Two selections (``train.ensemble.selection``), each with its own mix (an :class:`EnsembleChoice`):

- ``within_se`` (the default) keeps, with equal weights, every head whose validation log-loss (after the head's
  own temperature) is within ``width`` standard errors of the best head's, the error being that of the paired
  per-row gap with rows summed by split unit. Every head stopped early on these same rows, so their validation
  scores carry selection noise of different sizes; weights fitted to those scores follow the noise, and equal
  weights over the heads the rows cannot tell apart do not. The kept heads are pooled as they were judged, each
  at that temperature, by their geometric mean (``log_mean``, ``crossmodal.heads.averaged``): the average of
  uncalibrated members let an over-confident member outvote the others, and was both less accurate and less
  calibrated on test (figures in docs/heads.md).
- ``greedy`` is ensemble selection with replacement (Caruana et al. 2004): start from the single best head on
  validation and then, ``rounds`` times, add the head (any head again included) whose addition gives the best
  validation score of the averaged probabilities; a head's weight is its share of the picks. ``metric`` log_loss
  moves with every row and is far less noisy on a few hundred validation rows than macro-F1, which only moves
  when an argmax flips. The weights were fitted to that plain average, so it is the greedy ensemble's mix (T = 1).

Candidates are the run's heads on frozen features (``crossmodal.heads``) and, with ``train.ensemble.pool: all``
(the default), its ``cnn_rnn`` and ``finetune_xattn``: heads that see the rows through other inputs (word pieces,
tuned encoders) err on other rows, which is what an average gains from. When every member reads the frozen
features the ensemble is one :class:`~crossmodal.heads.averaged.AveragedHead` (:func:`averaged_ensemble`), saved and
served like any head on one pair of encoders; otherwise :func:`save_model_ensemble` keeps the members' folders and
the served model runs each on its own inputs (``crossmodal.serving.fused_model.EnsembleFusedModel``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crossmodal.errors import TrainError
from crossmodal.heads.averaged import EnsembleChoice

EPS = 1e-12


def _score(proba: np.ndarray, y: np.ndarray, metric: str) -> tuple[float, float]:
    """(primary, tie-break), both lower-is-better."""
    from sklearn.metrics import f1_score

    nll = float(-np.log(np.clip(proba[np.arange(len(y)), y], EPS, None)).mean())
    if metric == "log_loss":
        return nll, 0.0
    return -float(f1_score(y, proba.argmax(1), average="macro", zero_division=0)), nll


def _candidates(val_proba: dict[str, np.ndarray], y: np.ndarray) -> tuple[list[str], np.ndarray]:
    """The heads' names and the labels as int64, or the TrainError that says why there is nothing to choose on."""
    if not val_proba:
        raise TrainError("the ensemble has no heads to choose from; train at least one frozen-feature head")
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        raise TrainError("the ensemble is chosen on validation rows, and the val split has none")
    return list(val_proba), y


def select_members(val_proba: dict[str, np.ndarray], y: np.ndarray, rounds: int = 30,
                   metric: str = "log_loss") -> dict[str, int]:
    """How many times greedy selection with replacement picks each head (heads never picked are left out).

    Ties go to the head named first in ``val_proba``, so the result depends only on the inputs."""
    names, y = _candidates(val_proba, y)
    probas = [np.asarray(val_proba[n], dtype=np.float64) for n in names]
    counts = np.zeros(len(names), dtype=np.int64)
    total = np.zeros_like(probas[0])
    for _ in range(rounds):
        scores = [_score((total + p) / (counts.sum() + 1), y, metric) for p in probas]
        best = min(range(len(names)), key=lambda i: (scores[i], i))
        counts[best] += 1
        total += probas[best]
    return {n: int(c) for n, c in zip(names, counts, strict=True) if c > 0}


def within_se_members(val_proba: dict[str, np.ndarray], y: np.ndarray, groups: np.ndarray | None = None,
                      width: float = 2.0) -> tuple[dict[str, int], dict[str, dict]]:
    """The heads whose validation log-loss, each after its own temperature, is within ``width`` standard errors of
    the best head's; each counts once. Returns the counts and, per head, what decided it (its temperature too).

    The standard error is of the paired per-row difference to the best head, summed within each of ``groups``
    (rows of one unit are not independent evidence: an icon at four sizes, a product's photos) before the
    spread is taken. A temperature per head first, so that a head which ranks well but is under-confident is
    not dropped for its calibration, which the ensemble's average does not inherit row for row."""
    from crossmodal.evaluation.calibration import apply_temperature, fit_temperature

    names, y = _candidates(val_proba, y)
    codes = np.arange(len(y)) if groups is None else np.unique(np.asarray(groups).astype(str), return_inverse=True)[1]
    losses, temperatures = {}, {}
    for n in names:
        temperatures[n] = fit_temperature(y, val_proba[n])
        p = apply_temperature(val_proba[n], temperatures[n]).astype(np.float64)
        losses[n] = -np.log(np.clip(p[np.arange(len(y)), y], EPS, None))
    best = min(names, key=lambda n: (losses[n].mean(), names.index(n)))
    record = {}
    for n in names:
        d = losses[n] - losses[best]
        gap = float(d.mean())
        se = float(np.sqrt((np.bincount(codes, weights=d - gap) ** 2).sum()) / len(y))
        record[n] = {"val_log_loss": float(losses[n].mean()), "temperature": float(temperatures[n]), "gap": gap,
                     "se": se, "kept": gap <= width * se}
    return {n: 1 for n in names if record[n]["kept"]}, record


def choose_ensemble(models_dir, candidates: list[str], data, cfg) -> tuple[EnsembleChoice, list[dict]]:
    """Choose the ensemble on the val rows of ``data`` among the trained heads ``candidates`` under ``models_dir``
    (their ``predictions.npz`` hold the val probabilities). Returns the choice (members' weights summing to 1,
    their temperatures, the pooling) and a one-record history (the validation score of the chosen mix, the
    members, and for within_se each candidate's evidence)."""
    from crossmodal.artifacts import PREDICTIONS_FILE

    models_dir = Path(models_dir)
    val_proba = {}
    for name in candidates:
        with np.load(models_dir / name / PREDICTIONS_FILE, allow_pickle=False) as npz:
            if not np.array_equal(npz["val_ids"], data.ids["val"].astype(str)):
                raise TrainError(f"{models_dir / name} was trained on other validation rows than this run's; "
                                 "run `crossmodal train` again")
            val_proba[name] = npz["val_proba"]
    if cfg.ensemble.selection == "within_se":
        counts, record = within_se_members(val_proba, data.y["val"], data.groups.get("val"), cfg.ensemble.width)
        temperatures, pooling = {n: record[n]["temperature"] for n in counts}, "log_mean"
    else:
        counts, record = select_members(val_proba, data.y["val"], cfg.ensemble.rounds, cfg.ensemble.metric), None
        temperatures, pooling = {n: 1.0 for n in counts}, "mean"
    choice = EnsembleChoice({n: c / sum(counts.values()) for n, c in counts.items()}, temperatures, pooling)
    mix = choice.pool(val_proba).astype(np.float64)
    nll, f1 = _score(mix, data.y["val"], "log_loss")[0], -_score(mix, data.y["val"], "macro_f1")[0]
    history = [{"epoch": 1, "val_macro_f1": f1, "val_loss": nll, "train_loss": None, "members": choice.weights,
                "selection": cfg.ensemble.selection, "pooling": pooling, "temperatures": temperatures}]
    if record is not None:
        history[0]["candidates"] = record
    return choice, history


def averaged_ensemble(models_dir, choice: EnsembleChoice):
    """The ensemble of heads on the frozen features (each ``models_dir/<name>``) as one head, in eval mode: saved,
    registered and served like any head, on one pair of encoders."""
    from crossmodal.heads.files import load_head
    from crossmodal.heads.registry import ensemble_of

    return ensemble_of([load_head(Path(models_dir) / n) for n in choice.weights], list(choice.weights.values()),
                       [choice.temperatures[n] for n in choice.weights], choice.pooling)


PROBA_KEYS = ("val_proba", "test_proba", "test_proba_missing_text", "test_proba_missing_image")


def save_model_ensemble(models_dir, choice: EnsembleChoice, history: list[dict], labels: list[str], cfg,
                        seconds: float) -> dict:
    """Write ``models_dir/ensemble/`` for members on other inputs than the frozen features (``cnn_rnn``,
    ``finetune_xattn``; ``train.ensemble.pool: all``): each member's folder under ``members/`` (less its
    predictions), the mix in ``init_args`` (``members``: the weights, ``temperatures``, ``pooling``), and
    ``predictions.npz`` the members' pooled (the served model, ``crossmodal.serving.fused_model.EnsembleFusedModel``,
    pools the same way). Returns the head's summary."""
    import json
    import shutil

    from crossmodal.artifacts import HEAD_FILE, MEMBERS_DIR, PREDICTIONS_FILE
    from crossmodal.evaluation.metrics import compute_metrics
    from crossmodal.files import atomic_dir

    models_dir = Path(models_dir)
    saved = {}
    for name in choice.weights:
        with np.load(models_dir / name / PREDICTIONS_FILE, allow_pickle=False) as npz:
            saved[name] = {k: npz[k] for k in npz.files}
    first = next(iter(saved.values()))
    for name, pred in saved.items():
        if not all(np.array_equal(pred[k], first[k]) for k in ("val_ids", "test_ids")):
            raise TrainError(f"{models_dir / name} predicted other rows than {next(iter(saved))}; "
                             "run `crossmodal train` again")
    mix = {k: choice.pool({n: pred[k] for n, pred in saved.items()})
           for k in PROBA_KEYS if all(k in pred for pred in saved.values())}
    val_metrics = compute_metrics(first["val_y"], mix["val_proba"], labels)
    meta = {"name": "ensemble", "modality": "fusion", "init_args": {"name": "ensemble", **choice.init_args()},
            "best_epoch": 1, "epochs_run": 1, "train_seconds": round(seconds, 3), "val_metrics": val_metrics,
            "history": history, "labels": labels, "config": cfg.model_dump(), "family": "ensemble"}
    with atomic_dir(models_dir / "ensemble") as tmp:
        for name in choice.weights:
            shutil.copytree(models_dir / name, tmp / MEMBERS_DIR / name,
                            ignore=shutil.ignore_patterns(PREDICTIONS_FILE))
        (tmp / HEAD_FILE).write_text(json.dumps(meta, indent=2))
        np.savez(tmp / PREDICTIONS_FILE, **mix, **{k: first[k] for k in ("val_y", "test_y", "val_ids", "test_ids")})
    return {"head": "ensemble", "dir": str(models_dir / "ensemble"), "val_macro_f1": val_metrics["macro_f1"],
            "best_epoch": 1, "epochs_run": 1, "seconds": round(seconds, 3)}
