"""The fine-tuned cross-attention head: what trains and what stays frozen, resuming from a checkpoint, absent
modalities, and the served pyfunc model on raw rows (the spatial cross-attention itself: tests/heads/test_xattn.py).

One interrupted-then-resumed run on the tiny demo data (2 epochs, 64 px, a few dozen rows) serves most tests.
"""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import mlflow
from crossmodal.config import EncodersConfig
from crossmodal.errors import PredictionInputError
from crossmodal.heads import xattn
from crossmodal.serving.fused_model import FinetunedFusedModel, FusedModel
from crossmodal.serving.package import log_model, save_model_dir
from crossmodal.training import finetune


class Interrupted(Exception):
    pass


@pytest.fixture(scope="module")
def finetune_config(tiny_config):
    """``finetune_config(root, **finetune)``: tiny_config with two fine-tuning epochs, checkpoints under root/ckpt,
    and other train.finetune settings overridden."""
    def make(root, **finetune):
        return tiny_config(root, train={"finetune": {"epochs": 2, "checkpoint_dir": str(root / "ckpt"), **finetune}})

    return make


@pytest.fixture(scope="module")
def resumed_run(tiny_run, tmp_path_factory, finetune_config):
    """Epoch 1, then an interruption; a second call resumes at epoch 2. Captures the model after epoch 2."""
    root = tmp_path_factory.mktemp("finetune")
    cfg = finetune_config(root)
    validated = tiny_run["validated_dir"] / "validated.parquet"
    first_seen, second_seen, models = [], [], {}

    def interrupt_after_first(epoch, row, model):
        first_seen.append(epoch)
        raise Interrupted(f"stopped after epoch {epoch}")

    with pytest.raises(Interrupted):
        finetune.finetune_head(validated, cfg.train, cfg.encoders, root / "models", on_epoch_end=interrupt_after_first)
    (ckpt,) = (root / "ckpt").iterdir()
    after_interrupt = json.loads((ckpt / "checkpoint.json").read_text())

    def record(epoch, row, model):
        second_seen.append(epoch)
        models[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    info = finetune.finetune_head(validated, cfg.train, cfg.encoders, root / "models", on_epoch_end=record)
    return {"cfg": cfg, "root": root, "validated": validated, "info": info, "first_seen": first_seen,
            "second_seen": second_seen, "after_interrupt": after_interrupt, "state": models[2],
            "models": root / "models", "tiny_run": tiny_run}


def test_resume_continues_from_the_next_epoch(resumed_run):
    assert resumed_run["first_seen"] == [1]
    assert resumed_run["after_interrupt"]["epoch"] == 1
    assert resumed_run["second_seen"] == [2], "the resumed run must start at epoch 2, not restart at 1"
    info = resumed_run["info"]
    assert info["resumed_from_epoch"] == 2
    assert [h["epoch"] for h in info["history"]] == [1, 2]
    assert info["history"][0] == resumed_run["after_interrupt"]["history"][0]


def test_a_finished_checkpoint_is_reused_and_other_settings_are_not(resumed_run, finetune_config):
    r = resumed_run
    seen = []
    again = finetune.finetune_head(r["validated"], r["cfg"].train, r["cfg"].encoders, r["root"] / "again",
                                   on_epoch_end=lambda e, row, m: seen.append(e))
    assert seen == [] and again["resumed_from_epoch"] == 3 and again["history"] == r["info"]["history"]
    before = np.load(r["models"] / "finetune_xattn" / "predictions.npz")["test_proba"]
    after = np.load(r["root"] / "again" / "finetune_xattn" / "predictions.npz")["test_proba"]
    np.testing.assert_allclose(before, after, atol=1e-5)
    other = finetune_config(r["root"], lr_head=3e-3, epochs=1)
    assert finetune.fingerprint(pd.read_parquet(r["validated"]), r["info"]["labels"], other.train, other.encoders,
                                "fp32") != r["info"]["checkpoint"].rsplit("/", 1)[-1]


def test_finetuning_changes_tuned_layers_and_only_those(resumed_run):
    trained = resumed_run["state"]
    info = resumed_run["info"]
    pretrained = xattn.build_model(json.loads((resumed_run["models"] / "finetune_xattn" / "head.json")
                                                 .read_text())["init_args"]).state_dict()
    model = xattn.build_model(info["init_args"])
    tuned_prefixes = [p for p in model.tuned_prefixes() if p != "head."]
    assert any(p.startswith("image.units.") for p in tuned_prefixes)
    assert any(p.startswith("text.model.") for p in tuned_prefixes)
    for prefix in tuned_prefixes:
        weights = [k for k in pretrained if k.startswith(prefix) and pretrained[k].is_floating_point()
                   and "running" not in k]
        assert weights, prefix
        assert any(not torch.equal(trained[k], pretrained[k]) for k in weights), f"{prefix} did not change"
    frozen = [k for k in pretrained if not k.startswith(tuple(model.tuned_prefixes()))]
    assert len(frozen) > 100
    changed = [k for k in frozen if not torch.equal(trained[k], pretrained[k])]
    assert changed == [], f"frozen tensors changed (BatchNorm statistics included): {changed[:5]}"


def test_outputs_follow_the_head_contract(resumed_run):
    head_dir = resumed_run["models"] / "finetune_xattn"
    meta = json.loads((head_dir / "head.json").read_text())
    assert meta["name"] == "finetune_xattn" and meta["modality"] == "fusion" and meta["family"] == "finetuned"
    assert {"best_epoch", "epochs_run", "history", "val_metrics"} <= set(meta)
    assert meta["train_rows_used"] <= resumed_run["cfg"].train.finetune.max_train_rows
    with np.load(head_dir / "predictions.npz") as npz:
        n_test, classes = npz["test_proba"].shape
        for key in ("test_proba_missing_text", "test_proba_missing_image"):
            assert npz[key].shape == (n_test, classes)
            np.testing.assert_allclose(npz[key].sum(1), 1, atol=1e-4)
        assert len(npz["val_ids"]) == len(npz["val_y"]) == len(npz["val_proba"])
    from safetensors.torch import load_file

    saved = load_file(str(head_dir / "weights.safetensors"))
    assert any(k.startswith("head.") for k in saved) and any(k.startswith("image.units.") for k in saved)
    assert not any(k.startswith("text.model.embeddings") for k in saved)  # frozen layers come from the package


def test_lr_schedule_warms_up_then_decays():
    f = [finetune.lr_factor(s, 100, 10, "cosine") for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:])) and f[-1] < 0.01
    assert finetune.lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)


def test_modality_dropout_never_drops_both():
    img, txt = finetune.modality_dropout_masks(10_000, 0.4, torch.Generator().manual_seed(0))
    assert not (img & txt).any()
    assert 0.3 < img.float().mean() < 0.5 and 0.3 < txt.float().mean() < 0.5


def test_modality_dropout_never_hides_the_only_modality_a_row_has():
    n = 10_000
    image_missing, text_missing = torch.arange(n) % 4 == 0, torch.arange(n) % 4 == 1
    img, txt = finetune.modality_dropout_masks(n, 0.4, torch.Generator().manual_seed(0), image_missing, text_missing)
    assert not (img & text_missing).any() and not (txt & image_missing).any()
    assert not (img & txt).any()
    both = ~(image_missing | text_missing)  # rows with both modalities lose one at the usual rate
    assert 0.3 < img[both].float().mean() < 0.5 and 0.3 < txt[both].float().mean() < 0.5


def test_served_model_predicts_from_raw_rows_and_absent_modalities(resumed_run, tmp_path):
    r = resumed_run
    folder = save_model_dir(r["models"], "finetune_xattn", r["cfg"].encoders, tmp_path / "m")
    model = FusedModel.load(folder)
    assert isinstance(model, FinetunedFusedModel)
    frame = pd.read_parquet(r["validated"])
    test = frame[frame["split"] == "test"].head(4)
    images, texts = test["image"].tolist(), test["text"].tolist()
    full = model.predict_proba(images, texts)
    # The served model reproduces the trainer's test probabilities (same preprocessing, same weights).
    with np.load(r["models"] / "finetune_xattn" / "predictions.npz") as npz:
        expected = npz["test_proba"][: len(test)]
        missing_image = npz["test_proba_missing_image"][: len(test)]
    np.testing.assert_allclose(full, expected, atol=2e-3)
    text_only = model.predict_proba(None, texts)
    np.testing.assert_allclose(text_only, missing_image, atol=2e-3)
    mixed = model.predict_proba([images[0], None], [None, texts[1]])
    assert mixed.shape == (2, len(model.labels))
    np.testing.assert_allclose(mixed.sum(1), 1, atol=1e-5)
    assert not np.allclose(mixed[0], full[0], atol=1e-6)
    with pytest.raises(PredictionInputError, match="row 0: no image and no text"):
        model.predict_proba([None], [" "])
    with pytest.raises(PredictionInputError, match="not a decodable image"):
        model.predict_proba([b"not an image"], ["text"])


def test_pyfunc_logs_and_predicts_on_raw_rows(resumed_run, mlflow_store):
    r = resumed_run
    frame = pd.read_parquet(r["validated"])
    test = frame[frame["split"] == "test"]
    with mlflow.start_run():
        info = log_model(r["models"], "finetune_xattn", r["cfg"], test)
    served = mlflow.pyfunc.load_model(info.model_uri)
    head = test.head(3).reset_index(drop=True)
    rows = pd.DataFrame({"image_bytes": [Path(p).read_bytes() for p in head["image"]], "text": head["text"]})
    out = served.predict(rows)
    labels = json.loads((r["models"] / "labels.json").read_text())
    assert list(out.columns) == ["label"] + [f"prob_{c}" for c in labels]
    direct = FusedModel.load(save_model_dir(r["models"], "finetune_xattn", EncodersConfig(), r["root"] / "direct"))
    pd.testing.assert_frame_equal(out, direct.predict(rows), atol=1e-4)


def test_train_all_runs_finetune_last_and_skips_it_when_disabled(tiny_run, tmp_path):
    from crossmodal.features.extract import extract_features
    from crossmodal.training.train import train_all

    cfg = tiny_run["cfg"]
    feats = extract_features(tiny_run["validated_dir"] / "validated.parquet", cfg.encoders, cfg.paths.cache)
    train = cfg.train.model_copy(update={"heads": ["finetune_xattn", "concat"]})
    (tmp_path / "models" / "finetune_xattn").mkdir(parents=True)
    (tmp_path / "models" / "finetune_xattn" / "head.json").write_text("{}")  # left by an earlier run
    train.finetune = train.finetune.model_copy(update={"enabled": False})
    result = train_all(tiny_run["validated_dir"] / "validated.parquet", feats.image_path, feats.text_path, train,
                       tmp_path / "models")
    assert result.heads == ["concat"] and not (tmp_path / "models" / "finetune_xattn").exists()
    # the tiny session run trains it (enabled by default), after the frozen heads
    assert (tiny_run["models"] / "finetune_xattn" / "head.json").is_file()
    assert "finetune_xattn" in tiny_run["metrics"]["heads"]


def test_no_finetune_cli_option(tiny_run, tmp_path):
    from typer.testing import CliRunner

    from crossmodal.cli import app
    from crossmodal.features.extract import extract_features

    cfg = tiny_run["cfg"]
    extract_features(tiny_run["validated_dir"] / "validated.parquet", cfg.encoders, cfg.paths.cache,
                     tmp_path / "features")
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump()))
    result = CliRunner().invoke(app, ["train", "--validated", str(tiny_run["validated_dir"]), "--features",
                                      str(tmp_path / "features"), "--out", str(tmp_path / "models"), "--params",
                                      str(tmp_path / "params.yaml"), "--no-finetune"])
    assert result.exit_code == 0, result.output
    assert "finetune_xattn" not in result.output and "concat" in result.output
    assert not (tmp_path / "models" / "finetune_xattn").exists()


def test_a_half_written_checkpoint_is_not_resumed(resumed_run, tmp_path, finetune_config):
    """Tensors of epoch 2 next to the JSON of epoch 1 (a crash between the two writes): train from the start."""
    import shutil

    r = resumed_run
    (ckpt,) = (r["root"] / "ckpt").iterdir()
    copy = tmp_path / "ckpt" / ckpt.name
    shutil.copytree(ckpt, copy)
    meta = json.loads((copy / "checkpoint.json").read_text())
    (copy / "checkpoint.json").write_text(json.dumps({**meta, "epoch": 1}))
    cfg = finetune_config(tmp_path)
    seen = []
    info = finetune.finetune_head(r["validated"], cfg.train, cfg.encoders, tmp_path / "models",
                                  on_epoch_end=lambda e, row, m: seen.append(e))
    assert seen == [1, 2] and info["resumed_from_epoch"] is None
