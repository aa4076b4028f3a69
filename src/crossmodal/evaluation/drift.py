"""Drift statistics: is a batch of new rows drawn like the training rows? Two-sample tests, numpy and scipy only.

    import numpy as np
    from crossmodal.evaluation.drift import label_test, mmd_test
    rng = np.random.default_rng(0)
    reference, batch = rng.normal(size=(500, 16)), rng.normal(size=(200, 16)) + 0.5
    mmd_test(reference, batch, alpha=0.01, permutations=500, seed=0)
    # {"statistic": 0.0742.., "p_value": 0.001996.. (= 1/501), "drifted": True, "n": 200, "n_reference": 500, ...}
    label_test(["cat"] * 90 + ["dog"] * 10, {"cat": 500, "dog": 500})["drifted"]    # True

- :func:`mmd_test`, per modality on embeddings: the unbiased squared maximum mean discrepancy (Gretton et al., 2012)
  with a Gaussian (RBF) kernel whose bandwidth is the median pairwise distance of the pooled sample, and a
  permutation p-value ``(1 + #{permuted >= observed}) / (1 + permutations)``. Rows with a NaN (an absent
  modality) are left out and counted out of ``n``; each side is subsampled (seeded) to at most ``max_rows``.
- :func:`label_test`: predicted label counts against the training label counts, Pearson's chi-square goodness of
  fit; its p-value is scipy's asymptotic one when every expected count is at least 5, else a Monte Carlo one from
  ``permutations`` multinomial draws under the training proportions (small expected counts break the asymptotics).

Both return ``{"statistic", "p_value", "drifted", "n", "n_reference", "alpha", "method"}``; with too few rows to
test, ``statistic`` and ``p_value`` are None, ``drifted`` False and ``reason`` says why. The permutation and Monte
Carlo p-values are exact (never below the nominal rate when nothing drifted), so a batch from the training
distribution is flagged at most ``alpha`` of the time; the same inputs and seed give the same result.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

PERMUTATION_BLOCK = 100  # permutations scored per matrix product: bounds memory at block x rows floats
MIN_EXPECTED = 5.0  # the usual floor on expected counts for the chi-square approximation


def _result(statistic: float | None, p_value: float | None, alpha: float, n: int, n_reference: int, method: str,
            reason: str | None = None, **extra: Any) -> dict[str, Any]:
    out = {"statistic": statistic, "p_value": p_value,
           "drifted": bool(p_value is not None and p_value < alpha), "n": int(n), "n_reference": int(n_reference),
           "alpha": float(alpha), "method": method, **extra}
    if reason:
        out["reason"] = reason
    return out


def _present(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d array (rows, dim), got shape {x.shape}")
    return x[~np.isnan(x).any(axis=1)]


def _subsample(x: np.ndarray, max_rows: int, rng: np.random.Generator) -> np.ndarray:
    if len(x) <= max_rows:
        return x
    return x[np.sort(rng.choice(len(x), size=max_rows, replace=False))]


def rbf_kernel(z: np.ndarray) -> tuple[np.ndarray, float]:
    """The Gaussian kernel matrix of the rows of ``z`` and its bandwidth (the median pairwise distance)."""
    sq = np.einsum("ij,ij->i", z, z)
    d2 = np.clip(sq[:, None] + sq[None, :] - 2.0 * (z @ z.T), 0.0, None)
    off = d2[np.triu_indices(len(z), k=1)]
    positive = off[off > 0]
    # All rows identical: any bandwidth gives the same (zero) discrepancy; 1 avoids dividing by zero.
    med = float(np.median(positive)) if len(positive) else 1.0
    return np.exp(-d2 / (2.0 * med)), float(np.sqrt(med))


def _mmd_u(kernel: np.ndarray, members: np.ndarray, n: int) -> np.ndarray:
    """Unbiased MMD^2 for each row of ``members`` ((P, N) 0/1: which pooled rows form the first sample)."""
    m = len(kernel) - n
    row_sums = kernel.sum(axis=1)
    total = row_sums.sum()
    s_xx = np.einsum("pj,pj->p", members @ kernel, members)  # sum of k(x, x') over the first sample, diagonal in
    s_xy = members @ row_sums - s_xx
    s_yy = total - s_xx - 2.0 * s_xy
    # The diagonal of an RBF kernel is 1: removing it (n and m terms) makes the within-sample means unbiased.
    return (s_xx - n) / (n * (n - 1)) + (s_yy - m) / (m * (m - 1)) - 2.0 * s_xy / (n * m)


def mmd_test(reference: np.ndarray, batch: np.ndarray, *, alpha: float = 0.01, permutations: int = 500,
             max_rows: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Two-sample MMD test of ``batch`` against ``reference`` (rows = embeddings); see the module docstring."""
    ref, new = _present(reference), _present(batch)
    n_ref, n_new = len(ref), len(new)
    if n_ref < 2 or n_new < 2:
        return _result(None, None, alpha, n_new, n_ref, "mmd-rbf",
                       reason=f"too few rows with this modality to test (batch {n_new}, reference {n_ref}; "
                              "need 2 each)")
    if ref.shape[1] != new.shape[1]:
        raise ValueError(f"reference has {ref.shape[1]}-d embeddings but the batch {new.shape[1]}-d: "
                         "not the same embedding space")
    rng = np.random.default_rng(seed)
    x, y = _subsample(new, max_rows, rng), _subsample(ref, max_rows, rng)
    n, total = len(x), len(x) + len(y)
    kernel, bandwidth = rbf_kernel(np.concatenate([x, y]))
    observed_members = np.zeros((1, total))
    observed_members[0, :n] = 1.0
    observed = float(_mmd_u(kernel, observed_members, n)[0])
    exceed = 0
    for start in range(0, permutations, PERMUTATION_BLOCK):
        size = min(PERMUTATION_BLOCK, permutations - start)
        chosen = np.argsort(rng.random((size, total)), axis=1)[:, :n]  # a uniform random n-subset per row
        members = np.zeros((size, total))
        np.put_along_axis(members, chosen, 1.0, axis=1)
        # A tolerance so that ties (identical samples) count as "at least as extreme", not as rounding luck.
        exceed += int(np.sum(_mmd_u(kernel, members, n) >= observed - 1e-12))
    p_value = (1 + exceed) / (1 + permutations)
    return _result(observed, p_value, alpha, n_new, n_ref, "mmd-rbf", bandwidth=bandwidth,
                   tested={"batch": n, "reference": len(y)})


def _chi_square(observed: np.ndarray, expected: np.ndarray) -> np.ndarray:
    return ((observed - expected) ** 2 / expected).sum(axis=-1)


def label_test(predicted: Iterable[str] | Mapping[str, int], reference_counts: Mapping[str, int], *,
               alpha: float = 0.01, permutations: int = 500, seed: int = 0) -> dict[str, Any]:
    """Goodness of fit of the batch's predicted labels (a sequence, or counts per label) to the training label
    counts; see the module docstring."""
    counts = Counter(predicted) if not isinstance(predicted, Mapping) else Counter(dict(predicted))
    reference = {str(k): int(v) for k, v in reference_counts.items() if int(v) > 0}
    labels = sorted(set(reference) | {str(k) for k, v in counts.items() if v > 0})
    n, n_ref = int(sum(counts.values())), int(sum(reference.values()))
    if n < 1 or n_ref < 1:
        return _result(None, None, alpha, n, n_ref, "chi-square",
                       reason=f"nothing to compare (batch {n} labels, reference {n_ref})")
    ref = np.array([reference.get(c, 0) for c in labels], dtype=np.float64)
    if (ref == 0).any():
        # A label the training rows never had: add half a row to every class (Jeffreys) so the expectation is
        # small but not zero, and the label shows up as a large contribution rather than a division by zero.
        ref = ref + 0.5
    proportions = ref / ref.sum()
    observed = np.array([counts.get(c, 0) for c in labels], dtype=np.float64)
    expected = n * proportions
    statistic = float(_chi_square(observed, expected))
    extra = {"counts": {c: int(o) for c, o in zip(labels, observed)},
             "expected": {c: round(float(e), 3) for c, e in zip(labels, expected)}}
    if len(labels) < 2:
        return _result(0.0, 1.0, alpha, n, n_ref, "chi-square", **extra)
    if expected.min() >= MIN_EXPECTED:
        from scipy.stats import chisquare

        p_value = float(chisquare(observed, expected).pvalue)
        return _result(statistic, p_value, alpha, n, n_ref, "chi-square", **extra)
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, proportions, size=permutations).astype(np.float64)
    exceed = int(np.sum(_chi_square(draws, expected) >= statistic - 1e-9))
    p_value = (1 + exceed) / (1 + permutations)
    return _result(statistic, p_value, alpha, n, n_ref, "chi-square-monte-carlo", **extra)


# ----------------------------------------------------------------------------- calibrated on held-out rows
# Rows of real data come in clusters (one product photographed four times, one patient scanned twice), and a grouped
# split keeps whole clusters apart: new data is new clusters. A permutation test on rows then flags any batch of new
# clusters, drifted or not (its rows resemble each other more than they resemble the reference), so the tests below
# ask instead whether the batch looks as new as the model's own held-out rows did: their null distribution is drawn
# from the validation and test rows of the training run, resampled by whole units (group, else id), the way new
# data arrives.
def _unit_resamples(units: np.ndarray, size: int, resamples: int, rng: np.random.Generator) -> list[np.ndarray]:
    """``resamples`` row-index sets of about ``size`` rows, each whole units in a random order until ``size``."""
    codes, _ = _factorize(units)
    order_rows = np.argsort(codes, kind="stable")
    counts = np.bincount(codes)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    out = []
    for _ in range(resamples):
        perm = rng.permutation(len(counts))
        cum = np.cumsum(counts[perm])
        take = perm[: int(np.searchsorted(cum, size)) + 1]
        out.append(np.concatenate([order_rows[starts[u] : starts[u] + counts[u]] for u in take])[:size])
    return out


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    uniques, codes = np.unique(np.asarray(values).astype(str), return_inverse=True)
    return codes.ravel(), uniques


def _cross_kernel(a: np.ndarray, b: np.ndarray, bandwidth: float, block: int = 512) -> np.ndarray:
    """The Gaussian kernel between the rows of ``a`` and of ``b``, in blocks of ``a``'s rows."""
    b2 = np.einsum("ij,ij->i", b, b)
    out = np.empty((len(a), len(b)))
    for s in range(0, len(a), block):
        ab = a[s : s + block]
        d2 = np.clip(np.einsum("ij,ij->i", ab, ab)[:, None] + b2[None, :] - 2.0 * ab @ b.T, 0.0, None)
        out[s : s + block] = np.exp(-d2 / (2.0 * bandwidth**2))
    return out


def _mmd_to(k_xx: np.ndarray, k_xr: np.ndarray, r_term: float) -> float:
    n = len(k_xx)
    return float((k_xx.sum() - np.trace(k_xx)) / (n * (n - 1)) + r_term - 2.0 * k_xr.mean())


def heldout_mmd_test(train: np.ndarray, heldout: np.ndarray, heldout_units, batch: np.ndarray, *,
                     alpha: float = 0.01, resamples: int = 500, max_rows: int = 1000,
                     seed: int = 0) -> dict[str, Any]:
    """Is the ``batch`` further from the training rows than the model's own held-out rows were?

    The statistic is the unbiased squared MMD (Gaussian kernel, bandwidth the median pairwise distance of the
    training sample) between the batch and the training rows; its null is the same statistic for ``resamples``
    draws of whole held-out units (``heldout_units``) of the batch's size (at most half the held-out rows), so a
    batch of new but ordinary clusters scores like the held-out clusters did. One-sided p-value.
    """
    rng = np.random.default_rng(seed)
    ref, new = _present(train), _present(batch)
    held = np.asarray(heldout, dtype=np.float64)
    keep = ~np.isnan(held).any(axis=1) if held.ndim == 2 and len(held) else np.zeros(0, dtype=bool)
    held, units = held[keep], np.asarray(heldout_units)[keep]
    if len(ref) < 2 or len(new) < 2 or len(held) < 4:
        return _result(None, None, alpha, len(new), len(ref), "mmd-vs-heldout",
                       reason=f"too few rows with this modality to test (batch {len(new)}, training {len(ref)}, "
                              f"held-out {len(held)}; need 2, 2 and 4)")
    if ref.shape[1] != new.shape[1]:
        raise ValueError(f"reference has {ref.shape[1]}-d embeddings but the batch {new.shape[1]}-d: "
                         "not the same embedding space")
    ref = _subsample(ref, max_rows, rng)
    new = _subsample(new, max_rows, rng)
    k_rr, bandwidth = rbf_kernel(ref)
    r_term = float((k_rr.sum() - len(ref)) / (len(ref) * (len(ref) - 1)))
    observed = _mmd_to(_cross_kernel(new, new, bandwidth), _cross_kernel(new, ref, bandwidth), r_term)
    size = max(2, min(len(new), len(held) // 2))
    k_hh, k_hr = _cross_kernel(held, held, bandwidth), _cross_kernel(held, ref, bandwidth)
    null = np.array([_mmd_to(k_hh[np.ix_(idx, idx)], k_hr[idx], r_term)
                     for idx in _unit_resamples(units, size, resamples, rng)])
    p_value = (1 + int(np.sum(null >= observed - 1e-12))) / (1 + resamples)
    return _result(observed, p_value, alpha, len(new), len(ref), "mmd-vs-heldout", bandwidth=bandwidth,
                   heldout_median=float(np.median(null)),
                   tested={"batch": len(new), "training": len(ref), "heldout": len(held), "draw": size})


def label_shift_test(predicted: Iterable[str] | Mapping[str, int], heldout_predicted, heldout_units, *,
                     alpha: float = 0.01, resamples: int = 500, seed: int = 0) -> dict[str, Any]:
    """Is the batch's predicted-label mix further from the held-out rows' predicted mix than same-size draws of
    whole held-out units are? Statistic: the total variation distance between the two mixes."""
    counts = Counter(predicted) if not isinstance(predicted, Mapping) else Counter(dict(predicted))
    held = np.asarray(heldout_predicted).astype(str)
    n = int(sum(counts.values()))
    if n < 1 or len(held) < 4:
        return _result(None, None, alpha, n, len(held), "label-mix-vs-heldout",
                       reason=f"nothing to compare (batch {n} labels, held-out {len(held)})")
    labels = sorted(set(held) | {str(k) for k, v in counts.items() if v > 0})
    index = {c: i for i, c in enumerate(labels)}
    base = np.bincount([index[c] for c in held], minlength=len(labels)) / len(held)
    mix = np.array([counts.get(c, 0) for c in labels], dtype=np.float64) / n
    observed = 0.5 * float(np.abs(mix - base).sum())
    rng = np.random.default_rng(seed)
    codes = np.array([index[c] for c in held])
    size = max(1, min(n, len(held) // 2))
    null = np.array([0.5 * np.abs(np.bincount(codes[idx], minlength=len(labels)) / len(idx) - base).sum()
                     for idx in _unit_resamples(np.asarray(heldout_units), size, resamples, rng)])
    p_value = (1 + int(np.sum(null >= observed - 1e-12))) / (1 + resamples)
    return _result(observed, p_value, alpha, n, len(held), "label-mix-vs-heldout",
                   counts={c: int(counts.get(c, 0)) for c in labels},
                   heldout_share={c: round(float(b), 4) for c, b in zip(labels, base, strict=True)})
