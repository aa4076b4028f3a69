"""The linear probe, seed bagging and greedy ensemble selection: what they fit, write and serve."""

from __future__ import annotations

import json

import numpy as np
import pytest

from crossmodal.config import TrainConfig
from crossmodal.errors import TrainError
from crossmodal.evaluation.evaluate import evaluate_all
from crossmodal.heads.files import load_head
from crossmodal.heads.inference import predict_proba
from crossmodal.training.dataset import SplitFeatures, load_split_features
from crossmodal.training.ensemble import select_members, within_se_members
from crossmodal.training.linear_probe import train_linear_probe
from crossmodal.training.tasks import plan_training
from crossmodal.training.train import train_all

FAST = dict(hidden_dim=32, max_epochs=15, patience=5, batch_size=32)
GREEDY_REASON = "its members were chosen on these validation rows: a temperature fitted on them is fitted in-sample"


def _linear_task(n=400, classes=3, seed=0, scale=1.0) -> SplitFeatures:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    image = rng.normal(size=(n, 12)) * 5 + 3
    text = rng.normal(size=(n, 6)) * 0.1
    image[:, :classes] += scale * 5 * np.eye(classes)[y]
    text[:, :classes] += scale * 0.1 * np.eye(classes)[y]
    split = np.array(["train", "val", "test"])[rng.choice(3, n, p=[0.6, 0.2, 0.2])]
    return SplitFeatures.from_arrays(image, text, y, split)


@pytest.mark.parametrize("classes", [2, 4])
def test_linear_probe_head_predicts_what_the_regression_predicts(classes):
    from sklearn.linear_model import LogisticRegression

    data = _linear_task(classes=classes, scale=0.4)
    cfg = TrainConfig(linear_probe={"c_grid": [0.05, 1.0]})
    head, history = train_linear_probe(data, cfg, classes)
    assert [h["C"] for h in history] == [0.05, 1.0] and sum(h["chosen"] for h in history) == 1
    chosen = next(h["C"] for h in history if h["chosen"])
    # The same regression, fitted here on hand-standardised features, gives the torch head's probabilities.
    train = np.hstack([data.image["train"], data.text["train"]]).astype(np.float64)
    mean, std = train.mean(0), train.std(0)
    clf = LogisticRegression(C=chosen, max_iter=300, class_weight="balanced").fit((train - mean) / std,
                                                                                  data.y["train"])
    test = np.hstack([data.image["test"], data.text["test"]]).astype(np.float64)
    expected = clf.predict_proba((test - mean) / std)
    got = predict_proba(head, data.image["test"], data.text["test"])
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_linear_probe_scores_an_absent_modality_from_the_other():
    data = _linear_task()
    head, _ = train_linear_probe(data, TrainConfig(), 3)
    text = data.text["test"].copy()
    text[:5] = np.nan
    proba = predict_proba(head, data.image["test"], text)
    assert np.isfinite(proba).all() and (proba[:5].argmax(1) == data.y["test"][:5]).mean() >= 0.6


def test_greedy_selection_prefers_the_better_head_and_picks_with_replacement():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    good = np.full((300, 3), 0.1)
    good[np.arange(300), y] = 0.8
    noise = rng.dirichlet(np.ones(3), 300)
    counts = select_members({"noise": noise, "good": good}, y, rounds=10)
    assert counts["good"] > counts.get("noise", 0) and sum(counts.values()) == 10
    # Two heads wrong on different rows: the mix beats either alone, so both are picked.
    a, b = good.copy(), good.copy()
    a[:100] = np.roll(a[:100], 1, axis=1)
    b[100:200] = np.roll(b[100:200], 1, axis=1)
    both = select_members({"a": a, "b": b}, y, rounds=10)
    assert set(both) == {"a", "b"}
    assert select_members({"a": a, "b": b}, y, rounds=10, metric="macro_f1").keys() <= {"a", "b"}
    with pytest.raises(TrainError, match="val split has none"):
        select_members({"a": a[:0]}, y[:0])


def _noisy(y, flip, seed, classes=3, confidence=0.8):
    """Probabilities that put ``confidence`` on the true class except on a random ``flip`` share of rows."""
    rng = np.random.default_rng(seed)
    p = np.full((len(y), classes), (1 - confidence) / (classes - 1))
    wrong = rng.random(len(y)) < flip
    p[np.arange(len(y)), np.where(wrong, (y + 1) % classes, y)] = confidence
    return p


def test_within_se_keeps_the_heads_indistinguishable_from_the_best_with_equal_weights():
    y = np.random.default_rng(0).integers(0, 3, 600)
    heads = {"best": _noisy(y, 0.10, 1), "close": _noisy(y, 0.11, 2), "far": _noisy(y, 0.45, 3)}
    counts, record = within_se_members(heads, y)
    assert counts == {"best": 1, "close": 1}
    assert record["far"]["gap"] > 2 * record["far"]["se"] and not record["far"]["kept"]
    assert record["best"]["gap"] == 0 and record["best"]["kept"]
    # An under-confident head that ranks rows as well is judged after its own temperature, so it stays.
    soft = heads["close"] ** 0.3
    soft /= soft.sum(1, keepdims=True)
    assert within_se_members({"best": heads["best"], "soft": soft}, y)[0] == {"best": 1, "soft": 1}


def test_within_se_counts_a_group_once_so_repeated_rows_widen_the_interval():
    # 150 units of four rows each (an item at four sizes): the same evidence as 150 rows, not 600.
    units = np.random.default_rng(4).integers(0, 3, 150)
    y, groups = np.repeat(units, 4), np.repeat(np.arange(150), 4)
    a, b = np.repeat(_noisy(units, 0.10, 5), 4, axis=0), np.repeat(_noisy(units, 0.16, 6), 4, axis=0)
    _, by_row = within_se_members({"a": a, "b": b}, y)
    _, by_unit = within_se_members({"a": a, "b": b}, y, groups)
    assert by_unit["b"]["gap"] == pytest.approx(by_row["b"]["gap"])
    assert by_unit["b"]["se"] == pytest.approx(2 * by_row["b"]["se"], rel=0.05)  # sqrt(4) wider
    with pytest.raises(TrainError, match="val split has none"):
        within_se_members({"a": a[:0]}, y[:0])


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory, write_inputs):
    root = tmp_path_factory.mktemp("ensemble")
    (validated, image, text), _ = write_inputs(root / "in")
    cfg = TrainConfig(heads=["image_only", "text_only", "concat", "late", "stacking", "linear_probe", "ensemble"],
                      seeds=2, stacking={"folds": 2}, **FAST)
    result = train_all(validated, image, text, cfg, root / "models")
    return root, result, evaluate_all(root / "models", root / "reports")


def test_ensemble_is_built_from_the_trained_heads_and_saved_like_any_head(ensemble_run):
    root, result, metrics = ensemble_run
    meta = json.loads((root / "models" / "ensemble" / "head.json").read_text())
    assert meta["family"] == "ensemble" and meta["modality"] == "fusion"
    members = meta["history"][-1]["members"]
    assert set(members) <= {"image_only", "text_only", "concat", "late", "stacking", "linear_probe"}
    assert abs(sum(members.values()) - 1) < 1e-9
    candidates = meta["history"][-1]["candidates"]  # the default selection (within_se) says why each was kept
    assert set(candidates) == {"image_only", "text_only", "concat", "late", "stacking", "linear_probe"}
    assert {n for n, c in candidates.items() if c["kept"]} == set(members)
    assert len(set(members.values())) == 1  # equal weights
    assert metrics["heads"]["ensemble"]["selection"] == candidates
    # The kept heads are pooled as they were judged: each at its own temperature, by their geometric mean.
    temperatures = meta["history"][-1]["temperatures"]
    assert temperatures == {n: candidates[n]["temperature"] for n in members}
    head = load_head(root / "models" / "ensemble")
    assert head.init_args["pooling"] == "log_mean" and head.init_args["temperatures"] == list(temperatures.values())
    npz = np.load(root / "models" / "ensemble" / "predictions.npz")
    log = sum(w / temperatures[n] * np.log(np.load(root / "models" / n / "predictions.npz")["test_proba"])
              for n, w in members.items())
    mix = np.exp(log - log.max(1, keepdims=True))
    np.testing.assert_allclose(npz["test_proba"], mix / mix.sum(1, keepdims=True), atol=1e-5)
    data, _ = load_split_features(root / "in" / "validated.parquet", root / "in" / "image.npy", root / "in" / "text.npy")
    np.testing.assert_allclose(predict_proba(head, data.image["test"], data.text["test"]), npz["test_proba"], atol=1e-5)
    assert head.init_args["name"] == "ensemble"
    assert metrics["registered_head"] == "ensemble" and metrics["best_fusion"] == "ensemble"
    assert metrics["heads"]["linear_probe"]["family"] == "baseline"
    gain = metrics["heads"]["ensemble"]["test"]["macro_f1"] - metrics["heads"]["linear_probe"]["test"]["macro_f1"]
    assert metrics["fusion_gain_over_linear_probe"] == pytest.approx(gain)
    assert metrics["fusion_gain_interval"]["over_linear_probe"]["delta"] == pytest.approx(gain)


def test_seed_bagging_averages_k_seeds_and_reloads(ensemble_run):
    root, _, _ = ensemble_run
    meta = json.loads((root / "models" / "concat" / "head.json").read_text())
    assert meta["init_args"]["seeds"] == 2 and len(meta["history"][-1]["seed_best_epochs"]) == 2
    head = load_head(root / "models" / "concat")
    assert len(head.members) == 2
    first, second = (m.classifier[0].weight for m in head.members)
    assert not np.allclose(first.detach().numpy(), second.detach().numpy())  # two seeds, two different heads
    # Stacking holds one image_only and one text_only, not the bags: it trained its own base models.
    stacking = load_head(root / "models" / "stacking")
    assert stacking.init_args["name"] == "stacking" and "seeds" not in stacking.init_args


def test_the_ensemble_needs_heads_on_frozen_features(tmp_path, write_inputs):
    (validated, image, text), _ = write_inputs(tmp_path)
    with pytest.raises(TrainError, match="no head on frozen features"):
        train_all(validated, image, text, TrainConfig(heads=["ensemble", "traditional_text"]), tmp_path / "m")


def test_only_greedy_weights_keep_the_ensemble_at_t_1(ensemble_run, tmp_path, write_inputs):
    # within_se (the default run above) fits no weights: the split-half guard judges its temperature like any head's.
    _, _, metrics = ensemble_run
    assert metrics["heads"]["ensemble"]["calibration"]["reason"] != GREEDY_REASON
    (validated, image, text), _ = write_inputs(tmp_path / "in")
    cfg = TrainConfig(heads=["text_only", "concat", "ensemble"], ensemble={"selection": "greedy"}, **FAST)
    train_all(validated, image, text, cfg, tmp_path / "models")
    greedy = evaluate_all(tmp_path / "models", tmp_path / "reports")["heads"]["ensemble"]
    assert greedy["calibration"]["reason"] == GREEDY_REASON and greedy["temperature"] == 1.0
    assert "selection" not in greedy and sum(greedy["members"].values()) == pytest.approx(1)
    # Its weights were fitted to the plain average of the members as they are: that stays its mix.
    head = load_head(tmp_path / "models" / "ensemble")
    assert head.init_args["pooling"] == "mean" and set(head.init_args["temperatures"]) == {1.0}
    mix = sum(w * np.load(tmp_path / "models" / n / "predictions.npz")["test_proba"]
              for n, w in greedy["members"].items())
    np.testing.assert_allclose(np.load(tmp_path / "models" / "ensemble" / "predictions.npz")["test_proba"], mix,
                               atol=1e-5)


@pytest.mark.parametrize("pool", ["all", "frozen"])
def test_the_pool_decides_which_heads_the_ensemble_chooses_from(pool, write_inputs, tmp_path):
    (validated, image, text), _ = write_inputs(tmp_path)
    cfg = TrainConfig(heads=["concat", "cnn_rnn", "finetune_xattn", "ensemble"], ensemble={"pool": pool})
    _, tasks = plan_training(validated, image, text, cfg, tmp_path / "models")
    ensemble = next(t for t in tasks if t["kind"] == "ensemble")
    expected = ["concat", "cnn_rnn", "finetune_xattn"] if pool == "all" else ["concat"]
    assert ensemble["members"] == expected
    assert ensemble["after"] == [f"train-{h}" for h in expected]
