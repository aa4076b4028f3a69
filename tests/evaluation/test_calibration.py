"""Temperature scaling: fitted on validation, lowers NLL and ECE, keeps the argmax; the served model applies it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from crossmodal.evaluation.calibration import (
    GUARD_HALVINGS,
    apply_temperature,
    fit_temperature,
    guarded_temperature,
    temperature_nll,
)
from crossmodal.evaluation.metrics import expected_calibration_error, reliability_bins


def synthetic(n: int, accuracy: float, confidence: float, seed: int, classes: int = 3):
    """A model right with probability ``accuracy`` that always puts ``confidence`` on its prediction."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    wrong = (y + rng.integers(1, classes, n)) % classes
    pred = np.where(rng.random(n) < accuracy, y, wrong)
    proba = np.full((n, classes), (1 - confidence) / (classes - 1))
    proba[np.arange(n), pred] = confidence
    return y, proba


def test_over_confident_model_gets_t_above_one_and_better_nll_and_ece():
    y_val, p_val = synthetic(1500, accuracy=0.7, confidence=0.98, seed=0)
    y_test, p_test = synthetic(1500, accuracy=0.7, confidence=0.98, seed=1)
    t = fit_temperature(y_val, p_val)
    assert t > 1.5
    assert temperature_nll(y_val, p_val, t) < temperature_nll(y_val, p_val, 1.0) - 0.3
    calibrated = apply_temperature(p_test, t)
    assert expected_calibration_error(y_test, calibrated) < 0.05 < expected_calibration_error(y_test, p_test)
    assert np.array_equal(calibrated.argmax(1), p_test.argmax(1))  # the decision never changes


def two_groups(n: int, seed: int):
    """80 % of rows calibrated at 0.9, 20 % at 0.999 but right only 70 % of the time: the NLL-optimal T softens
    both groups, so the calibrated group becomes under-confident and the ECE gets worse."""
    rng = np.random.default_rng(seed)
    y, odd = rng.integers(0, 3, n), rng.random(n) < 0.2
    confidence = np.where(odd, 0.999, 0.9)
    pred = np.where(rng.random(n) < np.where(odd, 0.7, 0.9), y, (y + rng.integers(1, 3, n)) % 3)
    proba = np.tile(((1 - confidence) / 2)[:, None], (1, 3))
    proba[np.arange(n), pred] = confidence
    return y, proba


def test_the_guard_keeps_a_temperature_that_helps_on_held_out_rows():
    y, p = synthetic(600, accuracy=0.7, confidence=0.98, seed=0)
    guard = guarded_temperature(y, p)
    assert guard["accepted"] and guard["temperature"] == guard["fitted"] > 1.5
    assert len(guard["heldout_ece"]) == 2 * GUARD_HALVINGS  # each half of each cut held out once
    assert all(after < before for before, after in guard["heldout_ece"])


def test_the_guard_rarely_keeps_a_temperature_for_a_model_already_calibrated():
    # Right 80 % of the time at confidence 0.8: no T can help, and a T fitted on 300 rows is noise. A single cut
    # of validation let one in on 12 of 60 such samples; every half of three cuts must agree, so it almost never
    # passes.
    kept = [guarded_temperature(*synthetic(300, accuracy=0.8, confidence=0.8, seed=s))["accepted"] for s in range(40)]
    assert sum(kept) <= 2


def test_the_guard_rejects_a_temperature_that_makes_calibration_worse():
    y, p = two_groups(600, seed=0)
    guard = guarded_temperature(y, p)
    assert guard["fitted"] > 1.5 and not guard["accepted"] and guard["temperature"] == 1.0
    y_test, p_test = two_groups(3000, seed=1)  # new rows agree: the fitted T would have doubled the ECE
    assert expected_calibration_error(y_test, apply_temperature(p_test, guard["fitted"])) > \
        2 * expected_calibration_error(y_test, p_test)
    few = guarded_temperature(*synthetic(30, accuracy=0.7, confidence=0.98, seed=0))
    assert not few["accepted"] and "fewer than" in few["reason"]


def test_the_guard_never_scales_predictions_that_chose_the_model():
    y, p = synthetic(600, accuracy=0.7, confidence=0.98, seed=0)  # a T that helps, were the rows held out
    guard = guarded_temperature(y, p, in_sample=True)
    assert guard["fitted"] > 1.5 and not guard["accepted"] and guard["temperature"] == 1.0
    assert "in-sample" in guard["reason"]


def test_under_confident_model_gets_t_below_one():
    y, p = synthetic(1500, accuracy=0.95, confidence=0.5, seed=2)
    t = fit_temperature(y, p)
    assert t < 1
    assert temperature_nll(y, p, t) < temperature_nll(y, p, 1.0)


def test_apply_temperature_identity_rows_and_edge_cases():
    _, p = synthetic(50, 0.8, 0.9, seed=3)
    np.testing.assert_allclose(apply_temperature(p, 1.0), p, atol=1e-6)
    hot = apply_temperature(p, 100.0)
    np.testing.assert_allclose(hot, 1 / 3, atol=0.01)  # a very high T flattens to uniform
    np.testing.assert_allclose(apply_temperature(p, 0.3).sum(1), 1, atol=1e-6)
    assert fit_temperature(np.zeros(0, np.int64), np.zeros((0, 3))) == 1.0
    assert apply_temperature(np.zeros((0, 3)), 2.0).shape == (0, 3)


def test_reliability_bins_match_the_ece():
    y, p = synthetic(600, 0.7, 0.9, seed=4)
    conf, acc, count = reliability_bins(y, p)
    ece = (count / count.sum() * np.abs(acc - conf)).sum()
    assert ece == pytest.approx(expected_calibration_error(y, p))


def test_registered_pyfunc_returns_calibrated_probabilities(tiny_run, tiny_test_rows, mlflow_store, tmp_path):
    import mlflow
    from crossmodal.serving.fused_model import FusedModel
    from crossmodal.serving.package import log_model, save_model_dir

    metrics = tiny_run["metrics"]
    head = metrics["registered_head"]
    assert metrics["heads"][head]["family"] != "traditional"
    rows = tiny_test_rows(5).reset_index(drop=True)
    raw = FusedModel.load(save_model_dir(tiny_run["models"], head, tiny_run["cfg"].encoders, tmp_path / "raw"))
    raw_proba = raw.predict_proba(rows["image"].tolist(), rows["text"].tolist())

    temperature = 2.5  # far from 1, so calibrated and raw probabilities differ visibly
    with mlflow.start_run():
        info = log_model(tiny_run["models"], head, tiny_run["cfg"], rows, temperature)
    # Bytes, as a client sends them (the served model refuses file paths unless serving.allowed_image_root is set).
    frame = pd.DataFrame({"image_bytes": [Path(p).read_bytes() for p in rows["image"]], "text": rows["text"]})
    served = mlflow.pyfunc.load_model(info.model_uri).predict(frame)
    expected = apply_temperature(raw_proba, temperature)
    probs = served.filter(like="prob_").to_numpy()
    np.testing.assert_allclose(probs, expected, atol=1e-5)
    assert np.abs(probs - raw_proba).max() > 0.01
    labels = [c[len("prob_"):] for c in served.filter(like="prob_").columns]
    assert list(served["label"]) == [labels[k] for k in raw_proba.argmax(1)]
