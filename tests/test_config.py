"""Configuration: params.yaml equals the defaults, and bad configs fail with a message naming the key."""

import pytest

from crossmodal.config import Config, from_dict, load_config
from crossmodal.errors import ConfigError


def test_params_yaml_matches_defaults(repo_root):
    assert load_config(repo_root / "params.yaml") == Config()


def test_missing_file_gives_defaults(tmp_path):
    assert load_config(tmp_path / "absent.yaml") == Config()


def test_dotted_overrides(tmp_path):
    cfg = load_config(None, {"train.lr": 0.01, "data.columns.text": "caption"})
    assert cfg.train.lr == 0.01 and cfg.data.columns.text == "caption"


@pytest.mark.parametrize("text, needle", [
    ("train:\n  lrr: 0.1\n", "train.lrr: unknown key"),
    ("train:\n  optimizer: lion\n", "train.optimizer"),
    ("train:\n  heads: [concat, fancy]\n", "unknown head(s) ['fancy']"),
    ("train:\n  heads: [traditional_text]\n", "only traditional baselines"),
    ("train:\n  loss: hinge\n", "train.loss"),
    ("train:\n  stacking: {meta: forest}\n", "train.stacking.meta"),
    ("train:\n  ogm_ge: {alpha: 0}\n", "train.ogm_ge.alpha"),
    ("train:\n  traditional: {c_grid: [1.0, -2]}\n", "c_grid"),
    ("promotion:\n  metric: loss\n", "promotion.metric"),
    ("data:\n  columns: {image: x, text: x}\n", "both name column 'x'"),
    ("- just\n- a list\n", "must hold a mapping"),
    ("train: [unclosed\n", "not valid YAML"),
])
def test_invalid_configs_name_the_problem(tmp_path, text, needle):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert needle in str(err.value)


def test_unknown_allow_missing_value_is_a_config_error():
    with pytest.raises(ConfigError, match="validation.allow_missing"):
        from_dict({"validation": {"allow_missing": "both"}})
    with pytest.raises(ConfigError, match="train.modality_dropout"):
        from_dict({"train": {"modality_dropout": 1.0}})
