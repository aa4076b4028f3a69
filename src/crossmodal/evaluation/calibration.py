"""Temperature scaling: one T per head fitted on validation, ``p_cal = softmax(log(p) / T)``.

    from crossmodal.evaluation.calibration import apply_temperature, fit_temperature
    t = fit_temperature(y_val, p_val)
    p_test_cal = apply_temperature(p_test, t)     # same argmax, better calibrated

Scaling never changes the predicted label, so accuracy, macro-F1 and the winner stay the same.
"""

from __future__ import annotations

import numpy as np

TEMPERATURE_BOUNDS = (0.05, 20.0)  # log-space search range; T outside it means the probabilities are unusable
PROBA_EPS = 1e-12


def apply_temperature(proba: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log(p + 1e-12) / T)`` row-wise: T > 1 softens over-confident probabilities, T < 1 sharpens."""
    p = np.asarray(proba, dtype=np.float64)
    if p.size == 0:
        return p.astype(np.float32)
    z = np.log(p + PROBA_EPS) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def temperature_nll(y: np.ndarray, proba: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true class after temperature scaling."""
    y = np.asarray(y, dtype=np.int64)
    z = np.log(np.asarray(proba, dtype=np.float64) + PROBA_EPS) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(y)), y]).mean())


def fit_temperature(y: np.ndarray, proba: np.ndarray) -> float:
    """The T in TEMPERATURE_BOUNDS minimising validation NLL (bounded scalar search on log T); 1.0 without rows."""
    from scipy.optimize import minimize_scalar

    y = np.asarray(y, dtype=np.int64)
    if len(y) == 0:
        return 1.0
    lo, hi = np.log(TEMPERATURE_BOUNDS[0]), np.log(TEMPERATURE_BOUNDS[1])
    res = minimize_scalar(lambda log_t: temperature_nll(y, proba, np.exp(log_t)), bounds=(lo, hi),
                          method="bounded", options={"xatol": 1e-4})
    best = float(np.exp(res.x))
    # The NLL is convex in 1/T; still, never return a T that is worse than leaving the head alone.
    return best if temperature_nll(y, proba, best) <= temperature_nll(y, proba, 1.0) else 1.0
