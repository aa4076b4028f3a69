"""The ``ensemble`` head: greedy ensemble selection with replacement (Caruana et al. 2004) over trained heads.

    from crossmodal.training.ensemble import select_members, train_ensemble
    counts = select_members({"concat": p1, "late": p2}, y_val, rounds=30, metric="log_loss")   # {"concat": 18, ...}
    head, history = train_ensemble("work/models", ["concat", "late", "linear_probe"], data, cfg.train)

Selection starts from the single best head on validation and then, ``train.ensemble.rounds`` times, adds the head
(any head again included: with replacement) whose addition gives the best validation score of the averaged
probabilities; a head's weight is its share of the picks. Picking with replacement lets a strong head count more
than once and keeps the weights on a coarse grid, which is what makes the method hold up on new rows where a
free-form weight fit over-fits the validation split (Caruana et al., section 2.2). ``metric`` log_loss (the
default) scores a pick by the mean negative log-likelihood, which moves with every row and is far less noisy on a
few hundred validation rows than macro-F1, which only moves when an argmax flips.

Members are the run's heads on frozen features (``crossmodal.heads``): every one reads the same (image, text)
features, so the ensemble is one :class:`~crossmodal.heads.averaged.AveragedHead`, saved, registered and served from
raw inputs like any head with one pair of encoders.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from crossmodal.errors import TrainError

EPS = 1e-12


def _score(proba: np.ndarray, y: np.ndarray, metric: str) -> tuple[float, float]:
    """(primary, tie-break), both lower-is-better."""
    from sklearn.metrics import f1_score

    nll = float(-np.log(np.clip(proba[np.arange(len(y)), y], EPS, None)).mean())
    if metric == "log_loss":
        return nll, 0.0
    return -float(f1_score(y, proba.argmax(1), average="macro", zero_division=0)), nll


def select_members(val_proba: dict[str, np.ndarray], y: np.ndarray, rounds: int = 30,
                   metric: str = "log_loss") -> dict[str, int]:
    """How many times greedy selection with replacement picks each head (heads never picked are left out).

    Ties go to the head named first in ``val_proba``, so the result depends only on the inputs."""
    names = list(val_proba)
    if not names:
        raise TrainError("the ensemble has no heads to choose from; train at least one frozen-feature head")
    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        raise TrainError("the ensemble is chosen on validation rows, and the val split has none")
    probas = [np.asarray(val_proba[n], dtype=np.float64) for n in names]
    counts = np.zeros(len(names), dtype=np.int64)
    total = np.zeros_like(probas[0])
    for _ in range(rounds):
        scores = [_score((total + p) / (counts.sum() + 1), y, metric) for p in probas]
        best = min(range(len(names)), key=lambda i: (scores[i], i))
        counts[best] += 1
        total += probas[best]
    return {n: int(c) for n, c in zip(names, counts, strict=True) if c > 0}


def train_ensemble(models_dir, candidates: list[str], data, cfg):
    """Choose the ensemble on the val rows of ``data`` among the trained heads ``candidates`` under
    ``models_dir`` (their ``predictions.npz`` hold the val probabilities) and build it from their saved weights.
    Returns the head (eval mode) and a one-record history (the validation score of the chosen mix)."""
    from crossmodal.artifacts import PREDICTIONS_FILE
    from crossmodal.heads.files import load_head
    from crossmodal.heads.registry import build_head

    models_dir = Path(models_dir)
    val_proba = {}
    for name in candidates:
        with np.load(models_dir / name / PREDICTIONS_FILE, allow_pickle=False) as npz:
            if not np.array_equal(npz["val_ids"], data.ids["val"].astype(str)):
                raise TrainError(f"{models_dir / name} was trained on other validation rows than this run's; "
                                 "run `crossmodal train` again")
            val_proba[name] = npz["val_proba"]
    counts = select_members(val_proba, data.y["val"], cfg.ensemble.rounds, cfg.ensemble.metric)
    heads = {name: load_head(models_dir / name) for name in counts}
    first = next(iter(heads.values())).init_args
    head = build_head("ensemble", first["image_dim"], first["text_dim"], first["num_classes"],
                      hidden_dim=0, dropout=0.0, members=[heads[n].init_args for n in counts],
                      weights=[float(c) for c in counts.values()])
    head.load_state_dict({f"members.{i}.{k}": v for i, n in enumerate(counts) for k, v in heads[n].state_dict().items()}
                         | {"log_weights": head.log_weights}, strict=True)
    mix = sum(c * np.asarray(val_proba[n], dtype=np.float64) for n, c in counts.items()) / sum(counts.values())
    nll, f1 = _score(mix, data.y["val"], "log_loss")[0], -_score(mix, data.y["val"], "macro_f1")[0]
    history = [{"epoch": 1, "val_macro_f1": f1, "val_loss": nll, "train_loss": None,
                "members": {n: c / sum(counts.values()) for n, c in counts.items()}}]
    return head.eval(), history
