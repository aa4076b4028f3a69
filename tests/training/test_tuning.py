"""Per-head settings (train.head_params) and the pieces of the hyperparameter search: the search space, pruning
through train_head's on_epoch, a trial, and the tuned params file."""

from __future__ import annotations

import optuna
import pytest
import torch
import yaml

from crossmodal.config import load_config, parse_set
from crossmodal.errors import ConfigError
from crossmodal.training.dataset import load_split_features
from crossmodal.training.loop import train_head
from crossmodal.training.tuning import (
    PRUNE_AFTER_EPOCHS,
    EpochPruner,
    check_heads,
    default_heads,
    run_trial,
    search_space,
    start_params,
    tuned_params_text,
    tuning_job,
)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, write_inputs):
    paths, _ = write_inputs(tmp_path_factory.mktemp("tuning"), n=150)
    return paths


def _train_cfg(**train):
    return load_config(None, {"train": {"max_epochs": 8, "patience": 3, "hidden_dim": 32, **train}}).train


# ----------------------------------------------------------------------------- train.head_params
def test_a_head_trains_with_its_own_settings_and_the_others_with_the_train_section(inputs):
    data, labels = load_split_features(*inputs)
    own = _train_cfg(head_params={"concat": {"hidden_dim": 16, "lr": 0.01, "batch_size": 32}})
    same = _train_cfg(hidden_dim=16, lr=0.01, batch_size=32)  # what concat's head_params say, for every head

    head, history = train_head("concat", data, own, len(labels))
    reference, reference_history = train_head("concat", data, same, len(labels))
    assert head.init_args["hidden_dim"] == 16
    assert history == reference_history  # the lr and batch size took effect, to the bit
    for (name, a), (_, b) in zip(head.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name
    gated, _ = train_head("gated", data, own, len(labels))
    assert gated.init_args["hidden_dim"] == 32  # no head_params of its own: the train section's


def test_for_head_applies_only_the_keys_given():
    cfg = _train_cfg(head_params={"gated": {"dropout": 0.4}})
    gated = cfg.for_head("gated")
    assert (gated.dropout, gated.lr, gated.hidden_dim) == (0.4, cfg.lr, cfg.hidden_dim)
    assert cfg.for_head("concat") is cfg


@pytest.mark.parametrize("head_params, named", [
    ({"concat": {"lrr": 0.1}}, "train.head_params.concat.lrr: unknown key"),
    ({"nope": {"lr": 0.1}}, "no per-head settings for ['nope']"),
    ({"stacking": {"lr": 0.1}}, "stacking's base models are image_only and text_only"),
    ({"concat": {"dropout": 1.5}}, "train.head_params.concat.dropout"),
    ({"image_only": {"hidden_dim": 64}}, "stacking uses image_only and text_only as its base models"),
])
def test_a_bad_head_setting_is_a_config_error_that_names_it(head_params, named):
    with pytest.raises(ConfigError) as err:
        load_config(None, {"train.head_params": head_params})
    assert named in str(err.value)


def test_unimodal_sizes_may_differ_without_stacking_and_set_reaches_inside_head_params():
    cfg = load_config(None, {"train.heads": ["image_only", "text_only", "concat"],
                             "train.head_params": {"image_only": {"hidden_dim": 64}}})
    assert cfg.train.for_head("image_only").hidden_dim == 64
    overrides = parse_set(["train.head_params.concat.lr=0.02", "train.head_params.concat.patience=4"])
    concat = load_config(None, overrides).train.for_head("concat")
    assert (concat.lr, concat.patience) == (0.02, 4)
    with pytest.raises(ConfigError, match="unknown key"):
        load_config(None, parse_set(["train.head_params.concat.hidden=4"]))


# ----------------------------------------------------------------------------- the search space
def test_the_space_holds_each_heads_current_settings_and_only_what_affects_it():
    cfg = _train_cfg(hidden_dim=48, patience=20, weight_decay=0.0, head_params={"concat": {"lr": 0.05}})
    concat = search_space(cfg, "concat")
    actual, told = start_params(cfg, "concat", concat)
    assert actual["lr"] == 0.05 and actual["hidden_dim"] == 48 and actual["weight_decay"] == 0.0
    assert told["weight_decay"] == concat["weight_decay"].low > 0  # a log scale cannot hold 0
    for key, value in told.items():
        dist = concat[key]
        assert value in dist.choices if hasattr(dist, "choices") else dist.low <= value <= dist.high, key
    assert concat["lr"].log and concat["weight_decay"].log
    assert "modality_dropout" in concat and "modality_dropout" not in search_space(cfg, "image_only")
    assert "modality_dropout" not in search_space(cfg, "late")  # late decides a one-modality row alone
    # With stacking among the heads, its base models keep one hidden size: theirs is not searched.
    assert "hidden_dim" not in search_space(cfg, "text_only") and "hidden_dim" in concat
    assert "hidden_dim" in search_space(_train_cfg(heads=["text_only", "concat"]), "text_only")


def test_default_heads_are_the_loop_heads_of_train_heads_and_the_unimodal_ones():
    assert default_heads(_train_cfg(heads=["concat", "stacking", "linear_probe", "traditional_text"])) == [
        "image_only", "text_only", "concat"]
    with pytest.raises(ConfigError, match="cannot tune \\['stacking'\\]"):
        check_heads(["concat", "stacking"])


# ----------------------------------------------------------------------------- pruning
def test_a_trial_below_the_median_of_finished_trials_is_pruned_after_the_warm_up():
    finished = [{e: 0.8 + 0.01 * e for e in range(1, 11)}, {e: 0.7 for e in range(1, 11)},
                {e: 0.9 for e in range(1, 11)}]
    pruner = EpochPruner(finished)
    for epoch in range(1, PRUNE_AFTER_EPOCHS):  # below the median, but still warming up
        pruner({"epoch": epoch, "val_macro_f1": 0.5})
    with pytest.raises(optuna.TrialPruned):
        pruner({"epoch": PRUNE_AFTER_EPOCHS, "val_macro_f1": 0.5})
    assert pruner.pruned_at == PRUNE_AFTER_EPOCHS

    better = EpochPruner(finished)
    for epoch in range(1, 11):
        better({"epoch": epoch, "val_macro_f1": 0.95})
    assert better.pruned_at is None
    alone = EpochPruner(finished[:1])  # fewer finished trials than pruning waits for
    for epoch in range(1, 11):
        alone({"epoch": epoch, "val_macro_f1": 0.1})


def test_a_pruned_trial_stops_training_cleanly_and_says_where(inputs):
    job = tuning_job(*inputs, _train_cfg(max_epochs=30, patience=30))
    threads = torch.get_num_threads()
    perfect = [{str(e): 1.01 for e in range(1, 31)} for _ in range(2)]  # no trial can reach their median
    out = run_trial(job, "concat", {"lr": 0.001}, completed=perfect)
    assert out["pruned"] and out["pruned_at"] == PRUNE_AFTER_EPOCHS and out["value"] is None
    assert [h["epoch"] for h in out["history"]] == list(range(1, PRUNE_AFTER_EPOCHS + 1))
    assert torch.get_num_threads() == threads  # train_head's thread setting undone on the way out

    full = run_trial(job, "concat", {"lr": 0.001})
    assert not full["pruned"] and 0 <= full["value"] <= 1 and len(full["history"]) > PRUNE_AFTER_EPOCHS
    assert full["best_epoch"] == max(full["history"], key=lambda h: h["val_macro_f1"])["epoch"]


def test_a_setting_that_cannot_train_is_a_failed_trial_not_a_crash(inputs):
    job = tuning_job(*inputs, _train_cfg(optimizer="sgd"))
    out = run_trial(job, "concat", {"lr": 1e12})
    assert out["failed"] and "training loss became" in out["failed"] and out["value"] is None


# ----------------------------------------------------------------------------- tuned.yaml
def test_the_tuned_file_is_the_configuration_with_the_best_settings_and_loads(tmp_path):
    cfg = load_config(None, {"train.heads": ["image_only", "text_only", "concat", "stacking"],
                             "train.head_params": {"gated": {"dropout": 0.3}}, "data.manifest": "data/x.csv"})
    text = tuned_params_text(cfg, {"concat": {"lr": 0.003, "hidden_dim": 128}, "image_only": {"dropout": 0.1}},
                             ["crossmodal tune: 2 trials", "", "more"])
    assert text.startswith("# crossmodal tune: 2 trials\n#\n# more\n")
    path = tmp_path / "tuned.yaml"
    path.write_text(text)
    tuned = load_config(path)
    assert tuned.data.manifest == "data/x.csv"  # paths as given, not made absolute
    assert tuned.train.for_head("concat").hidden_dim == 128 and tuned.train.for_head("concat").lr == 0.003
    assert tuned.train.for_head("gated").dropout == 0.3  # head_params it had are kept
    assert yaml.safe_load(text)["train"]["head_params"]["image_only"] == {"dropout": 0.1}
    with pytest.raises(ConfigError, match="hidden_dim must agree"):
        tuned_params_text(cfg, {"image_only": {"hidden_dim": 64}}, [])
