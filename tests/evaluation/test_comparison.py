"""The paired comparison behind the promotion gate: bootstrap interval of a metric difference and exact McNemar."""

import numpy as np
import pytest

from crossmodal.evaluation.comparison import mcnemar_exact, paired_bootstrap
from crossmodal.evaluation.metrics import compute_metrics

LABELS = ["a", "b", "c"]


def _model(y: np.ndarray, accuracy: float, seed: int, n_classes: int = 3) -> np.ndarray:
    """Probabilities that are right on a share ``accuracy`` of the rows (exactly) and confidently wrong elsewhere."""
    rng = np.random.default_rng(seed)
    n = len(y)
    right = np.zeros(n, dtype=bool)
    right[rng.choice(n, int(round(accuracy * n)), replace=False)] = True
    pred = np.where(right, y, (y + rng.integers(1, n_classes, n)) % n_classes)
    proba = rng.uniform(0.0, 0.2, (n, n_classes))
    proba[np.arange(n), pred] += 0.8
    return proba / proba.sum(axis=1, keepdims=True)


@pytest.fixture
def rows():
    rng = np.random.default_rng(7)
    return rng.integers(0, 3, 500)


@pytest.mark.parametrize("metric", ["macro_f1", "accuracy", "roc_auc"])
def test_identical_models_differ_by_exactly_nothing(rows, metric):
    proba = _model(rows, 0.7, seed=1)
    out = paired_bootstrap(rows, proba, proba.copy(), LABELS, metric, resamples=300, seed=0)
    assert out["delta"] == 0.0 and out["ci_low"] == 0.0 and out["ci_high"] == 0.0
    assert not out["ci_low"] > 0.0  # the gate's rule (min_improvement 0): no promotion
    assert mcnemar_exact(proba.argmax(1) == rows, proba.argmax(1) == rows) == 1.0


@pytest.mark.parametrize("metric", ["macro_f1", "accuracy", "roc_auc"])
def test_point_estimates_match_compute_metrics(rows, metric):
    a, b = _model(rows, 0.6, seed=2), _model(rows, 0.8, seed=3)
    out = paired_bootstrap(rows, a, b, LABELS, metric, resamples=100, seed=0)
    assert out["score_a"] == pytest.approx(compute_metrics(rows, a, LABELS)[metric], abs=1e-12)
    assert out["score_b"] == pytest.approx(compute_metrics(rows, b, LABELS)[metric], abs=1e-12)
    assert out["delta"] == pytest.approx(out["score_b"] - out["score_a"])
    assert out["ci_low"] <= out["delta"] <= out["ci_high"]


def test_binary_auc_with_ties_matches_sklearn():
    from sklearn.metrics import roc_auc_score

    y = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 0])
    score = np.array([0.2, 0.8, 0.5, 0.5, 0.5, 0.1, 0.9, 0.7, 0.2, 0.3])  # ties across classes
    proba = np.c_[1 - score, score]
    out = paired_bootstrap(y, proba, proba, ["no", "yes"], "roc_auc", resamples=100)
    assert out["score_a"] == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_macro_f1_ignores_classes_absent_from_truth_and_predictions():
    y = np.array([0, 0, 1, 1])
    proba = np.eye(3)[[0, 1, 1, 1]]  # class 2 is never seen nor predicted
    out = paired_bootstrap(y, proba, proba, LABELS, "macro_f1", resamples=100)
    assert out["score_a"] == pytest.approx(compute_metrics(y, proba, LABELS)["macro_f1"])


def test_a_clearly_better_model_is_significant(rows):
    champion, challenger = _model(rows, 0.60, seed=4), _model(rows, 0.95, seed=5)
    out = paired_bootstrap(rows, champion, challenger, LABELS, "macro_f1", resamples=2000, seed=0)
    assert out["n_rows"] == 500 and out["resamples"] == 2000 and out["resamples_used"] == 2000
    assert out["delta"] > 0.25 and out["ci_low"] > 0.2  # promoted at min_improvement 0
    p = mcnemar_exact(champion.argmax(1) == rows, challenger.argmax(1) == rows)
    assert p < 0.001


def test_a_tiny_difference_on_few_rows_is_not_significant():
    y = np.arange(20) % 2
    right_a = np.ones(20, dtype=bool)
    right_a[[0, 1, 2, 3, 4]] = False  # 15 of 20 right
    right_b = right_a.copy()
    right_b[[0, 1]] = True
    right_b[[5]] = False  # 16 of 20 right: one row better
    a = np.eye(2)[np.where(right_a, y, 1 - y)]
    b = np.eye(2)[np.where(right_b, y, 1 - y)]
    out = paired_bootstrap(y, a, b, ["no", "yes"], "accuracy", resamples=2000, seed=0)
    assert out["delta"] == pytest.approx(0.05)
    assert out["ci_low"] < 0 < out["ci_high"]
    assert mcnemar_exact(right_a, right_b) == pytest.approx(1.0)  # 2 vs 1 discordant rows


def test_interval_is_reproducible_for_a_seed(rows):
    a, b = _model(rows, 0.7, seed=6), _model(rows, 0.75, seed=8)
    first = paired_bootstrap(rows, a, b, LABELS, "macro_f1", resamples=500, seed=11)
    assert paired_bootstrap(rows, a, b, LABELS, "macro_f1", resamples=500, seed=11) == first
    other = paired_bootstrap(rows, a, b, LABELS, "macro_f1", resamples=500, seed=12)
    assert (other["ci_low"], other["ci_high"]) != (first["ci_low"], first["ci_high"])
    assert other["delta"] == first["delta"]  # the point estimate does not depend on the seed


def test_interval_widens_with_confidence(rows):
    a, b = _model(rows, 0.7, seed=6), _model(rows, 0.75, seed=8)
    narrow = paired_bootstrap(rows, a, b, LABELS, "accuracy", resamples=1000, confidence=0.8)
    wide = paired_bootstrap(rows, a, b, LABELS, "accuracy", resamples=1000, confidence=0.99)
    assert wide["ci_low"] < narrow["ci_low"] and wide["ci_high"] > narrow["ci_high"]


def test_undefined_auc_gives_no_interval():
    y = np.zeros(10, dtype=int)  # one class only: AUC undefined
    proba = np.eye(2)[np.r_[np.zeros(5, int), np.ones(5, int)]]
    out = paired_bootstrap(y, proba, proba, ["no", "yes"], "roc_auc", resamples=100)
    assert out["delta"] is None and out["ci_low"] is None and out["resamples_used"] == 0


def test_mcnemar_exact_counts_only_discordant_rows():
    from scipy.stats import binomtest

    a = np.array([True] * 30 + [False] * 10 + [True] * 2 + [False] * 8)
    b = np.array([True] * 30 + [False] * 10 + [False] * 2 + [True] * 8)
    assert mcnemar_exact(a, b) == pytest.approx(binomtest(8, 10, 0.5).pvalue)
    assert mcnemar_exact(a, b) == mcnemar_exact(b, a)  # two-sided


@pytest.mark.parametrize("kwargs,match", [({"metric": "loss"}, "metric"), ({"resamples": 0}, "resamples"),
                                          ({"confidence": 1.0}, "confidence")])
def test_bad_arguments_are_refused(kwargs, match):
    y = np.array([0, 1])
    proba = np.eye(2)
    args = {"metric": "accuracy", **kwargs}
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(y, proba, proba, ["no", "yes"], **args)


def test_many_rows_stay_fast_and_bounded():
    import time

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 20_000)
    a, b = _model(y, 0.7, seed=1), _model(y, 0.71, seed=2)
    t0 = time.perf_counter()
    out = paired_bootstrap(y, a, b, LABELS, "macro_f1", resamples=2000, seed=0)
    assert time.perf_counter() - t0 < 30
    assert out["resamples_used"] == 2000 and out["ci_low"] < out["ci_high"]
