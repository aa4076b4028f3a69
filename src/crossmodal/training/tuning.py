"""Hyperparameter search for the frozen-feature heads: the search space, one trial, its pruning, tuned.yaml.

    from crossmodal.training.tuning import search_space, start_params, tuning_job, run_trial
    space = search_space(cfg.train, "concat")            # {"lr": FloatDistribution(1e-4, 1e-2, log=True), ...}
    job = tuning_job("validated.parquet", "image.npy", "text.npy", cfg.train)
    out = run_trial(job, "concat", {"lr": 0.003, "hidden_dim": 128}, completed=[])   # any process, JSON in and out
    out["value"], out["pruned"], out["history"]          # validation macro-F1, pruned or not, the epochs it ran

A trial trains one head with :func:`crossmodal.training.loop.train_head` on the run's cached features, its settings
being ``train`` with the trial's values as that head's ``train.head_params``, and scores it by its validation
macro-F1 (the figure the pipeline selects heads by). Trials are pruned by Optuna's MedianPruner, fed each epoch's
validation macro-F1 through ``train_head``'s ``on_epoch``: a trial whose best F1 so far is below the median of the
finished trials at the same epoch stops there. The study itself (the TPE sampler) lives with whoever asks for
trials (``flows.tuning``); a trial gets the finished trials' curves as JSON and prunes against them, so it runs in
any process or on any Dask worker. :func:`tuned_params_text` writes the tuned params file.
"""

from __future__ import annotations

import threading
import zlib
from typing import Any

import numpy as np
import yaml

from crossmodal.config import LOOP_HEADS, UNIMODAL_HEADS, Config, HeadParams, TrainConfig, from_dict
from crossmodal.data.split import SPLITS
from crossmodal.errors import ConfigError, TrainError
from crossmodal.training.dataset import load_split_features
from crossmodal.training.loop import macro_f1, train_head
from crossmodal.training.tasks import task_data

# What is searched, per setting: log-uniform for the two rates, categorical for the sizes. Each range is widened to
# hold the current value, so the first trial of every head (its current settings, the "before" figure) is a
# point of the space.
HIDDEN_DIMS = (64, 128, 256, 512)
BATCH_SIZES = (32, 64, 128, 256)
LR_RANGE = (1e-4, 1e-2)
WEIGHT_DECAY_RANGE = (1e-6, 1e-2)
DROPOUT_RANGE = (0.0, 0.5)
MODALITY_DROPOUT_RANGE = (0.0, 0.5)
PATIENCE_RANGE = (3, 15)
# Pruning: no trial is stopped before this many of the head's trials have finished (the median of one curve is
# that one trial's luck; two already tell a setting that trails both), nor before this epoch (the first epochs'
# F1 says little of where a head ends). Two, not Optuna's five: a search of a few trials per head still prunes.
PRUNE_AFTER_TRIALS = 2
PRUNE_AFTER_EPOCHS = 5
# Trials in threads of one process train one at a time: train_head seeds torch's per-process generator.
_TORCH = threading.Lock()


def default_heads(cfg: TrainConfig) -> list[str]:
    """The heads ``crossmodal tune`` searches unless told: the loop-trained heads of ``train.heads`` and the two
    unimodal heads (the baselines every fusion head is compared with, and stacking's base models)."""
    return [h for h in LOOP_HEADS if h in cfg.heads or h in UNIMODAL_HEADS]


def check_heads(heads: list[str]) -> list[str]:
    """``heads`` without repeats; ConfigError naming any that the loop does not train (nothing to tune there)."""
    bad = [h for h in heads if h not in LOOP_HEADS]
    if bad:
        raise ConfigError(f"--heads: cannot tune {bad}; tunable heads (trained by the shared loop) are "
                          f"{list(LOOP_HEADS)}")
    if not heads:
        raise ConfigError(f"--heads names no head; choose from {list(LOOP_HEADS)}")
    return list(dict.fromkeys(heads))


def _learns_missing(name: str) -> bool:
    """Whether modality dropout changes how head ``name`` trains (the loop applies it to these heads only)."""
    from crossmodal.heads.registry import HEADS

    cls = HEADS[name]
    return cls.modality == "fusion" and not getattr(cls, "decides_missing_alone", False)


def search_space(cfg: TrainConfig, name: str) -> dict[str, Any]:
    """Head ``name``'s Optuna distributions, each holding the head's current value.

    Left out: ``modality_dropout`` for heads it does not affect, and the unimodal heads' ``hidden_dim`` when
    ``train.heads`` has stacking (its base models must share one hidden size: ``config.TrainConfig``).
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    now = cfg.for_head(name)

    def span(bounds, value):
        return min(bounds[0], value), max(bounds[1], value)

    space: dict[str, Any] = {}
    if not (name in UNIMODAL_HEADS and "stacking" in cfg.heads):
        space["hidden_dim"] = CategoricalDistribution(sorted({*HIDDEN_DIMS, now.hidden_dim}))
    space["dropout"] = FloatDistribution(*span(DROPOUT_RANGE, now.dropout))
    space["lr"] = FloatDistribution(*span(LR_RANGE, now.lr), log=True)
    # A log scale cannot hold 0: a current weight decay of 0 is told to the sampler as the range's low end.
    space["weight_decay"] = FloatDistribution(*span(WEIGHT_DECAY_RANGE, now.weight_decay or WEIGHT_DECAY_RANGE[0]),
                                              log=True)
    space["batch_size"] = CategoricalDistribution(sorted({*BATCH_SIZES, now.batch_size}))
    if _learns_missing(name):
        space["modality_dropout"] = FloatDistribution(*span(MODALITY_DROPOUT_RANGE, now.modality_dropout))
    space["patience"] = IntDistribution(*span(PATIENCE_RANGE, now.patience))
    return space


def start_params(cfg: TrainConfig, name: str, space: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Head ``name``'s current settings over ``space``: (what the first trial trains with, what the sampler is told,
    which differ only where the space cannot hold the value: a weight decay of 0)."""
    now = cfg.for_head(name)
    actual = {key: getattr(now, key) for key in space}
    told = {key: (max(value, space[key].low) if key == "weight_decay" else value) for key, value in actual.items()}
    return actual, told


def sampler_seed(cfg: TrainConfig, name: str) -> int:
    """The TPE sampler's seed for head ``name``'s study: ``train.seed`` and the head, so heads draw independently."""
    return (cfg.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def trial_config(cfg: TrainConfig, name: str, params: dict[str, Any]) -> TrainConfig:
    """``cfg`` with ``params`` as head ``name``'s ``head_params`` (validated: a value out of bounds is an error)."""
    own = {**(cfg.head_params[name].model_dump(exclude_none=True) if name in cfg.head_params else {}), **params}
    return cfg.model_copy(update={"head_params": {**cfg.head_params, name: HeadParams(**own)}})


def tuning_job(validated_path, image_path, text_path, cfg: TrainConfig) -> dict:
    """What every trial reads: the run's files, labels and row counts (``crossmodal.training.tasks.task_data`` checks
    them in the process that trains) and the train settings, all JSON."""
    from pathlib import Path

    data, labels = load_split_features(validated_path, image_path, text_path)
    return {"validated": str(Path(validated_path).resolve()), "image": str(Path(image_path).resolve()),
            "text": str(Path(text_path).resolve()), "labels": labels,
            "rows": {s: int(len(data.y[s])) for s in SPLITS}, "train": cfg.model_dump(mode="json")}


class EpochPruner:
    """``on_epoch`` for :func:`train_head`: reports each epoch's validation macro-F1 to an Optuna trial and raises
    ``optuna.TrialPruned`` when the MedianPruner, against ``completed`` (the curves ``{epoch: F1}`` of the head's
    finished trials), says stop. ``history`` keeps the epochs seen, pruned or not."""

    def __init__(self, completed: list[dict[int, float]], after_trials: int = PRUNE_AFTER_TRIALS,
                 after_epochs: int = PRUNE_AFTER_EPOCHS):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(
            direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=after_trials, n_warmup_steps=after_epochs))
        for curve in completed:
            steps = {int(k): float(v) for k, v in curve.items()}
            if steps:
                self.study.add_trial(optuna.trial.create_trial(value=max(steps.values()), intermediate_values=steps))
        self.trial = self.study.ask()
        self.history: list[dict] = []
        self.pruned_at: int | None = None

    def __call__(self, record: dict) -> None:
        import optuna

        self.history.append(record)
        epoch, f1 = int(record["epoch"]), float(record["val_macro_f1"])
        self.trial.report(f1, epoch)
        if self.trial.should_prune():
            self.pruned_at = epoch
            raise optuna.TrialPruned(f"validation macro-F1 {f1:.4f} at epoch {epoch} is below the median")


def run_trial(job: dict, name: str, params: dict[str, Any], completed: list[dict] | None = None) -> dict:
    """Train head ``name`` with ``params`` (its ``head_params`` for this trial); returns ``{"value"`` (validation
    macro-F1 of the kept epoch, None when pruned or failed), ``"pruned"``, ``"pruned_at"``, ``"failed"`` (the reason a
    head could not train, e.g. a loss that became inf at a high learning rate), ``"history"``, ``"best_epoch"}``."""
    import optuna

    from crossmodal.heads.inference import predict_proba

    cfg = trial_config(TrainConfig.model_validate(job["train"]), name, params)
    data = task_data(job)
    pruner = EpochPruner(completed or [])
    out = {"head": name, "params": params, "value": None, "pruned": False, "pruned_at": None, "failed": None,
           "best_epoch": None}
    with _TORCH:
        try:
            head, history = train_head(name, data, cfg, len(job["labels"]), on_epoch=pruner)
        except optuna.TrialPruned:
            return {**out, "pruned": True, "pruned_at": pruner.pruned_at, "history": _epochs(pruner.history)}
        except TrainError as err:
            return {**out, "failed": str(err), "history": _epochs(pruner.history)}
        proba = predict_proba(head, data.image["val"], data.text["val"])
    best = max(history, key=lambda h: h["val_macro_f1"])
    return {**out, "value": macro_f1(data.y["val"], proba.argmax(1)), "history": _epochs(history),
            "best_epoch": int(best["epoch"])}


def _epochs(history: list[dict]) -> list[dict]:
    """The per-epoch figures a trial reports (JSON-safe floats)."""
    keys = ("train_loss", "val_loss", "val_macro_f1")
    return [{"epoch": int(h["epoch"]), **{k: float(h[k]) for k in keys if k in h and np.isfinite(h[k])}}
            for h in history]


def tuned_params_text(cfg: Config, best: dict[str, dict[str, Any]], header: list[str]) -> str:
    """The params file ``crossmodal tune`` writes: every setting of ``cfg`` (as the command read it, paths as
    given), with ``best`` (head -> settings) merged into ``train.head_params``, after ``header`` as comments.
    ConfigError if the result would not load (it is read back through the same models)."""
    data = cfg.model_dump(mode="json")
    head_params = {h: {k: v for k, v in p.items() if v is not None} for h, p in data["train"]["head_params"].items()}
    for head, params in best.items():
        head_params[head] = {**head_params.get(head, {}), **params}
    data["train"]["head_params"] = head_params
    from_dict(data, "the tuned parameters")  # what `crossmodal run --params tuned.yaml` will check
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120, allow_unicode=True)
    return "".join(f"# {line}\n" if line else "#\n" for line in header) + body
