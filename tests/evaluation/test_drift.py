"""Drift statistics (crossmodal.evaluation.drift) and the drift reference file (crossmodal.evaluation.drift_reference):
the false-alarm rate stays at alpha, real shifts are found, results are reproducible, the reference round-trips."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from crossmodal.config import DriftConfig, EncodersConfig
from crossmodal.errors import ConfigError
from crossmodal.evaluation.drift import label_test, mmd_test
from crossmodal.evaluation.drift_reference import embedding_space, read_drift_reference, write_drift_reference

ALPHA = 0.05  # the rate checks use a larger alpha than the default so that 20 seeds can tell a broken test
SEEDS = range(20)
KEYS = {"statistic", "p_value", "drifted", "n", "n_reference", "alpha", "method"}


def _gaussians(seed: int, shift: float = 0.0, n_ref: int = 300, n: int = 120, dim: int = 24):
    rng = np.random.default_rng(1000 + seed)
    return rng.normal(size=(n_ref, dim)), rng.normal(size=(n, dim)) + shift


def test_mmd_same_distribution_is_flagged_at_most_at_the_alpha_rate():
    results = [mmd_test(*_gaussians(s), alpha=ALPHA, permutations=199, seed=s) for s in SEEDS]
    assert all(set(r) >= KEYS for r in results)
    flagged = sum(r["drifted"] for r in results)
    assert flagged <= 3, [r["p_value"] for r in results]  # Binomial(20, 0.05) exceeds 3 with chance 1.6 %
    # p-values of a valid test spread over (0, 1], not piled at either end
    p = np.array([r["p_value"] for r in results])
    assert 0.25 < p.mean() < 0.75
    assert all(not r["drifted"] for r in (mmd_test(*_gaussians(s), seed=s) for s in range(5)))  # alpha 0.01


def test_mmd_flags_a_shift_and_reports_its_size():
    for shift in (0.5, 1.0):
        result = mmd_test(*_gaussians(0, shift=shift), permutations=199, seed=0)
        assert result["drifted"] is True and result["p_value"] == pytest.approx(1 / 200)
    small = mmd_test(*_gaussians(1, shift=0.5), seed=1)["statistic"]
    large = mmd_test(*_gaussians(1, shift=1.0), seed=1)["statistic"]
    assert large > small > 0
    # A change of scale, not of mean, is a change of distribution too.
    ref, new = _gaussians(2)
    assert mmd_test(ref, new * 2.0, seed=2)["drifted"] is True


def test_mmd_is_deterministic_for_a_seed_and_skips_absent_rows():
    ref, new = _gaussians(3, shift=0.1)
    assert mmd_test(ref, new, seed=7) == mmd_test(ref, new, seed=7)
    holes = new.copy()
    holes[::4] = np.nan  # rows without the modality
    result = mmd_test(ref, holes, seed=7)
    assert result["n"] == len(new) - len(new[::4]) and result["n_reference"] == len(ref)
    assert result["p_value"] is not None
    few = mmd_test(ref, holes[:1], seed=7)
    assert few["statistic"] is None and few["drifted"] is False and "too few" in few["reason"]
    with pytest.raises(ValueError, match="embedding space"):
        mmd_test(ref, new[:, :5])


def test_mmd_subsamples_both_sides():
    ref, new = _gaussians(4, n_ref=900, n=700)
    result = mmd_test(ref, new, max_rows=200, permutations=99, seed=4)
    assert result["tested"] == {"batch": 200, "reference": 200}
    assert (result["n"], result["n_reference"]) == (700, 900)
    identical = mmd_test(ref[:50], ref[:50].copy(), permutations=99, seed=0)
    assert identical["p_value"] == 1.0 and not identical["drifted"]


def test_label_test_same_distribution_is_not_flagged_and_a_shift_is():
    training = {"neutral": 400, "sarcastic": 250, "sincere": 350}
    labels, p = list(training), np.array(list(training.values())) / 1000
    flagged = 0
    for s in SEEDS:
        rng = np.random.default_rng(s)
        result = label_test(rng.choice(labels, size=150, p=p).tolist(), training, alpha=ALPHA, seed=s)
        assert set(result) >= KEYS and result["method"] == "chi-square"
        flagged += result["drifted"]
    assert flagged <= 3
    shifted = label_test(["sarcastic"] * 100 + ["neutral"] * 20, training)
    assert shifted["drifted"] is True and shifted["counts"] == {"neutral": 20, "sarcastic": 100, "sincere": 0}


def test_label_test_small_counts_use_monte_carlo():
    training = {"a": 500, "b": 480, "c": 20}  # expected count of c in a batch of 30: 0.6
    flagged = 0
    for s in SEEDS:
        rng = np.random.default_rng(s)
        batch = rng.choice(list(training), size=30, p=np.array([500, 480, 20]) / 1000).tolist()
        result = label_test(batch, training, alpha=ALPHA, permutations=999, seed=s)
        assert result["method"] == "chi-square-monte-carlo"
        flagged += result["drifted"]
    assert flagged <= 3
    assert label_test(["c"] * 12 + ["a"] * 3, training, seed=0)["drifted"] is True
    assert label_test({"a": 5, "b": 5}, training, seed=3) == label_test({"a": 5, "b": 5}, training, seed=3)
    # A label the training rows never had is drift, not a division by zero.
    unseen = label_test(["a"] * 10 + ["zebra"] * 10, training, seed=0)
    assert unseen["drifted"] is True and np.isfinite(unseen["statistic"])
    empty = label_test([], training)
    assert empty["p_value"] is None and empty["drifted"] is False


def test_drift_config_rejects_unresolvable_settings():
    assert DriftConfig().alpha == 0.01 and DriftConfig().permutations == 500
    with pytest.raises(ValueError, match="too few for alpha"):
        DriftConfig(alpha=0.01, permutations=50)
    from crossmodal.config import from_dict

    with pytest.raises(ConfigError, match="drift.alpha"):
        from_dict({"drift": {"alpha": 1.5}})


def test_drift_reference_round_trips_a_seeded_sample_of_train_rows(tmp_path):
    n = 60
    frame = pd.DataFrame({"id": [f"r{k}" for k in range(n)], "label": ["x", "y", "y"] * 20,
                          "split": (["train"] * 4 + ["val"]) * 12, "image": None, "text": None, "group": None,
                          "image_sha256": None, "_row": range(n)})
    frame.to_parquet(tmp_path / "validated.parquet")
    image = np.arange(n * 4, dtype=np.float32).reshape(n, 4)
    text = -np.arange(n * 3, dtype=np.float32).reshape(n, 3)
    text[5] = np.nan  # a row without its text stays a NaN row
    np.save(tmp_path / "image.npy", image)
    np.save(tmp_path / "text.npy", text)
    enc = EncodersConfig()

    def write(name: str, rows: int, seed: int):
        path = write_drift_reference(tmp_path / "validated.parquet", tmp_path / "image.npy", tmp_path / "text.npy",
                                     tmp_path / name, enc, rows=rows, seed=seed)
        return read_drift_reference(path)

    ref = write("a.npz", rows=20, seed=1)
    train = frame[frame["split"] == "train"]
    assert len(ref.ids) == 20 and set(ref.ids) <= set(train["id"]) and ref.meta["train_rows"] == len(train)
    assert ref.label_counts == train["label"].value_counts().to_dict()  # every train row, not only the sample
    rows = [int(i[1:]) for i in ref.ids]
    np.testing.assert_array_equal(ref.image, image[rows])
    np.testing.assert_array_equal(ref.text, text[rows])
    assert ref.space == embedding_space(enc)
    assert write("b.npz", rows=20, seed=1).ids == ref.ids and write("c.npz", rows=20, seed=2).ids != ref.ids
    assert len(write("d.npz", rows=1000, seed=1).ids) == len(train)


# ----------------------------------------------------------------------------- calibrated on held-out units
def _clustered(rng, n_units: int, per_unit: int = 4, dim: int = 8, shift: float = 0.0):
    """Rows in clusters (one item, several photos): unit centres from one distribution, rows near their centre."""
    centres = rng.normal(size=(n_units, dim))
    rows = np.repeat(centres, per_unit, axis=0) + 0.1 * rng.normal(size=(n_units * per_unit, dim)) + shift
    units = np.repeat([f"u{rng.integers(1 << 30)}-{k}" for k in range(n_units)], per_unit)
    return rows, units


def test_heldout_mmd_test_does_not_flag_new_clusters_of_the_same_population():
    from crossmodal.evaluation.drift import heldout_mmd_test, mmd_test

    flagged, mmd_flagged = 0, 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        train, _ = _clustered(rng, 150)
        held, units = _clustered(rng, 60)
        batch, _ = _clustered(rng, 40)  # new items, drawn like the others
        flagged += heldout_mmd_test(train, held, units, batch, alpha=0.05, resamples=200, seed=seed)["drifted"]
        mmd_flagged += mmd_test(train, batch, alpha=0.05, permutations=200, seed=seed)["drifted"]
    assert flagged <= 3, flagged
    assert mmd_flagged >= 15  # why the calibrated test exists: rows of new clusters are not exchangeable


def test_heldout_mmd_test_flags_a_shifted_batch():
    from crossmodal.evaluation.drift import heldout_mmd_test

    rng = np.random.default_rng(1)
    train, _ = _clustered(rng, 150)
    held, units = _clustered(rng, 60)
    batch, _ = _clustered(rng, 40, shift=1.0)
    out = heldout_mmd_test(train, held, units, batch, alpha=0.01, resamples=300, seed=0)
    assert out["drifted"] and out["statistic"] > out["heldout_median"] and out["p_value"] < 0.01
    again = heldout_mmd_test(train, held, units, batch, alpha=0.01, resamples=300, seed=0)
    assert again["p_value"] == out["p_value"] and again["statistic"] == out["statistic"]


def test_label_shift_test_against_heldout_predictions():
    from crossmodal.evaluation.drift import label_shift_test

    rng = np.random.default_rng(0)
    units = np.repeat([f"u{k}" for k in range(100)], 4)
    held = np.repeat(rng.choice(["a", "b", "c"], size=100, p=[0.5, 0.3, 0.2]), 4)
    same = list(np.repeat(rng.choice(["a", "b", "c"], size=30, p=[0.5, 0.3, 0.2]), 4))
    assert not label_shift_test(same, held, units, alpha=0.01, resamples=300)["drifted"]
    skewed = ["c"] * 100 + ["a"] * 20
    out = label_shift_test(skewed, held, units, alpha=0.01, resamples=300)
    assert out["drifted"] and out["statistic"] > 0.4
