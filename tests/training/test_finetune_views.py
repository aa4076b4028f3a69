"""Fine-tuning on augmented views (train.augment): it trains, its views' frozen outputs are cached and found again by
a run with other learning settings, the augmentation settings are part of the checkpoint's fingerprint, and the
``auto`` budget resolves by device."""

import json

import pandas as pd
import pytest
import torch

from crossmodal.config import FinetuneConfig
from crossmodal.training import finetune
from crossmodal.training.finetune_views import VIEWS_DIR

VIEWS = {"views": 2, "image": {"crop_scale": [0.6, 1.0]}, "text": {"deletion": 0.2}}


@pytest.fixture(scope="module")
def viewed_run(tiny_run, tmp_path_factory, tiny_config):
    """Two fine-tuning runs on two views per training row; the second with another head learning rate."""
    root = tmp_path_factory.mktemp("finetune-views")
    validated = tiny_run["validated_dir"] / "validated.parquet"

    def run(out: str, **finetune_settings):
        cfg = tiny_config(root, train={"finetune": {"epochs": 2, "checkpoint_dir": str(root / "ckpt"),
                                                    **finetune_settings}, "augment": VIEWS})
        return cfg, finetune.finetune_head(validated, cfg.train, cfg.encoders, root / out)

    cfg, first = run("first")
    chunks = {p.name for p in (root / "ckpt" / VIEWS_DIR).rglob("*.npy")}
    _, second = run("second", lr_head=1e-3)
    return {"root": root, "cfg": cfg, "first": first, "second": second, "chunks": chunks, "validated": validated}


def test_it_trains_on_the_views_and_says_so(viewed_run):
    info = viewed_run["first"]
    assert info["epochs_run"] == 2 and info["augment"]["views"] == 2
    assert info["views_seconds"] > 0
    assert all(torch.isfinite(torch.tensor(h["train_loss"])) for h in info["history"])
    head = json.loads((viewed_run["root"] / "first" / "finetune_xattn" / "head.json").read_text())
    assert head["init_args"]["image_size"] == 64  # the tiny config's number, not "auto"


def test_the_views_cache_is_found_by_a_run_with_other_learning_settings(viewed_run):
    shelves = viewed_run["root"] / "ckpt" / VIEWS_DIR
    assert {p.parent.parent.name for p in shelves.rglob("*.npy")} == {"image", "text"}
    assert viewed_run["first"]["checkpoint"] != viewed_run["second"]["checkpoint"]  # trained anew...
    assert {p.name for p in shelves.rglob("*.npy")} == viewed_run["chunks"]  # ... from the same views, not new ones


def test_augment_settings_are_part_of_the_fingerprint_only_when_views_are_on(viewed_run, tiny_config):
    r = viewed_run
    df = pd.read_parquet(r["validated"])
    labels = r["first"]["labels"]

    def key(augment):
        cfg = tiny_config(r["root"], train={"finetune": {"epochs": 2}, "augment": augment})
        return finetune.fingerprint(df, labels, cfg.train, cfg.encoders, "fp32")

    with_views = key(VIEWS)
    assert with_views != key({**VIEWS, "views": 3})
    assert with_views != key({**VIEWS, "image": {"crop_scale": [0.8, 1.0]}})
    assert with_views != key({**VIEWS, "text": {"swap": 0.3}})
    assert with_views != key({**VIEWS, "seed": 1})
    off = key({})
    assert off != with_views and off == key({"views": 0, "image": {"flip": False}}) == key({**VIEWS, "finetune": False})
    assert with_views == key({**VIEWS, "frozen": True})  # the frozen heads' switch does not change fine-tuning


def test_the_budget_resolves_auto_by_device_and_keeps_numbers():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    auto = FinetuneConfig()
    assert (auto.epochs, auto.max_train_rows, auto.image_size) == ("auto", "auto", "auto")
    on_cpu, on_gpu = finetune.resolve_budget(auto, cpu), finetune.resolve_budget(auto, gpu)
    assert isinstance(on_cpu.image_size, int) and isinstance(on_cpu.max_train_rows, int)
    assert on_gpu.image_size == 224 and on_gpu.max_train_rows is None and on_gpu.epochs > on_cpu.epochs
    given = FinetuneConfig(epochs=3, max_train_rows=None, image_size=64)
    assert finetune.resolve_budget(given, gpu) == given == finetune.resolve_budget(given, cpu)


def test_with_text_augmentation_off_the_views_reuse_the_rows_own_text_states(viewed_run, tiny_config):
    # The default: only images are augmented, so no text goes through the frozen layers again.
    root = viewed_run["root"]
    cfg = tiny_config(root, train={"finetune": {"epochs": 1, "checkpoint_dir": str(root / "ckpt-image-only")},
                                   "augment": {"views": 2}})
    info = finetune.finetune_head(viewed_run["validated"], cfg.train, cfg.encoders, root / "image-only")
    assert info["augment"]["text"] == {"token_dropout": 0.0, "deletion": 0.0, "swap": 0.0}
    shelves = root / "ckpt-image-only" / VIEWS_DIR
    assert (shelves / "image").is_dir() and not (shelves / "text").exists()
    assert torch.isfinite(torch.tensor(info["history"][0]["train_loss"]))
