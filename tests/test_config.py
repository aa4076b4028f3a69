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


# ----------------------------------------------------------------------------- --set and where values come from
def test_parse_set_reads_values_as_yaml():
    from crossmodal.config import parse_set

    got = parse_set(["train.max_epochs=30", "encoders.image.name=resnet18", "train.heads=[concat,gated]",
                     "data.data_root=null", "train.lr=0.01", "train.class_weights=false",
                     "mlflow.model_name=2024", "train.finetune={epochs: 2, resume: no}", "train.max_epochs=31"])
    assert got == {"train.max_epochs": 31, "encoders.image.name": "resnet18", "train.heads": ["concat", "gated"],
                   "data.data_root": None, "train.lr": 0.01, "train.class_weights": False,
                   "mlflow.model_name": "2024",  # a text setting keeps the text YAML would read as a number
                   "train.finetune.epochs": 2, "train.finetune.resume": False}  # a section's mapping: key by key
    cfg = load_config(None, got)
    assert cfg.train.heads == ["concat", "gated"] and cfg.data.data_root is None and cfg.train.max_epochs == 31
    assert cfg.train.finetune.epochs == 2 and cfg.train.finetune.batch_size == 32  # the section's other keys stay


@pytest.mark.parametrize("item, message", [
    ("train.max_epoch=3", "--set train.max_epoch=3: unknown setting train.max_epoch (did you mean train.max_epochs?)"),
    ("max_epochs=3", "unknown setting max_epochs (did you mean train.max_epochs?)"),
    ("zzz.qqq=1", "unknown setting zzz.qqq; `crossmodal config show` lists every setting"),
    ("train.max_epochs", "--set 'train.max_epochs': expected KEY=VALUE"),
    ("=3", "expected KEY=VALUE"),
    ("train=3", "train is a section, not a setting"),
    ("train.heads=[concat", "the value is not valid YAML"),
])
def test_parse_set_refuses_bad_items_in_one_line(item, message):
    from crossmodal.config import parse_set

    with pytest.raises(ConfigError) as err:
        parse_set([item])
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("override, message", [
    ({"train.max_epochs": 0}, "--set train.max_epochs=0: Input should be greater than or equal to 1"),
    ({"train.heads": ["nope"]}, "--set train.heads=[nope]: Value error, unknown head(s) ['nope']"),
    ({"train.finetune.model_dim": 30}, "--set train.finetune.model_dim=30: Value error, model_dim 30 must be"),
    ({"data.columns.text": "image"}, "--set data.columns.text=image: Value error, data.columns.text and"),
])
def test_bad_set_values_are_one_line_errors_naming_the_item(override, message):
    from crossmodal.config import load_config_with_sources

    with pytest.raises(ConfigError) as err:
        load_config_with_sources(None, override, {k: "--set" for k in override})
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_sources_say_where_each_value_came_from(tmp_path):
    from crossmodal.config import load_config_with_sources, setting_keys

    params = tmp_path / "p.yaml"
    params.write_text("train:\n  lr: 0.01\n  max_epochs: 9\n  finetune: {epochs: 3}\n")
    cfg, sources = load_config_with_sources(params, {"train.max_epochs": 3, "data.manifest": "m.csv"},
                                            {"train.max_epochs": "--set", "data.manifest": "option --manifest"})
    assert (cfg.train.max_epochs, cfg.train.lr, cfg.train.finetune.epochs) == (3, 0.01, 3)
    assert set(sources) == set(setting_keys()) and "train.finetune" not in sources  # settings, not sections
    assert sources["train.max_epochs"] == "--set" and sources["data.manifest"] == "option --manifest"
    assert sources["train.lr"] == sources["train.finetune.epochs"] == str(params)
    assert sources["train.patience"] == sources["train.finetune.lr_head"] == "default"
    assert load_config_with_sources(None, {"train.lr": 0.1})[1]["train.lr"] == "override"
    assert cfg == load_config(params, {"train.max_epochs": 3, "data.manifest": "m.csv"})
