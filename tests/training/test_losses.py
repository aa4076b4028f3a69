"""Class and modality imbalance: focal loss, auxiliary unimodal losses, OGM-GE gradient modulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from crossmodal.config import TrainConfig, from_dict
from crossmodal.errors import ConfigError
from crossmodal.heads.registry import build_head, fit_standardizers
from crossmodal.training.dataset import SplitFeatures
from crossmodal.training.loop import train_head
from crossmodal.training.losses import FocalLoss, make_criterion
from crossmodal.training.modality import ModalityBalancer, encoder_parameters, ogm_coefficients

FAST = dict(hidden_dim=32, dropout=0.1, lr=1e-2, batch_size=64, max_epochs=6, patience=10)


def _logits(n=64, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g) * 3, torch.randint(0, c, (n,), generator=g)


@pytest.mark.parametrize("weight", [None, torch.tensor([0.5, 2.0, 1.25])])
def test_focal_loss_with_gamma_zero_is_cross_entropy(weight):
    logits, y = _logits()
    expected = torch.nn.CrossEntropyLoss(weight=weight)(logits, y)
    assert FocalLoss(0.0, weight)(logits, y) == pytest.approx(float(expected), rel=1e-6)


def test_focal_loss_down_weights_easy_examples():
    # Row 0: confidently right (p_y ~ 0.98); row 1: hard (p_y ~ 0.12).
    logits = torch.tensor([[6.0, 0.0, 2.0], [0.0, 2.0, 0.0]])
    y = torch.tensor([0, 0])
    ce = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    focal = torch.stack([FocalLoss(2.0)(logits[i : i + 1], y[i : i + 1]) for i in range(2)])
    p = torch.softmax(logits, 1)[:, 0]
    torch.testing.assert_close(focal, (1 - p) ** 2 * ce)  # the formula, per example
    ratio = focal / ce
    assert ratio[0] < 0.001 and ratio[1] > 0.7  # the easy row nearly vanishes, the hard row keeps most of its loss
    assert (focal <= ce).all()


def test_make_criterion_and_config_choose_the_loss():
    assert isinstance(make_criterion(TrainConfig()), torch.nn.CrossEntropyLoss)
    focal = make_criterion(TrainConfig(loss="focal", focal_gamma=1.5), torch.ones(2))
    assert isinstance(focal, FocalLoss) and focal.gamma == 1.5
    with pytest.raises(ConfigError, match="train.loss"):
        from_dict({"train": {"loss": "hinge"}})
    with pytest.raises(ConfigError, match="train.focal_gamma"):
        from_dict({"train": {"focal_gamma": -1}})


def imbalanced_modalities(n=500, seed=0) -> SplitFeatures:
    """The image reads the label almost perfectly, the text only weakly: the image dominates."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    image = rng.normal(size=(n, 8))
    image[:, 0] += 3.0 * (2 * y - 1)
    text = rng.normal(size=(n, 6))
    text[:, 0] += 0.4 * (2 * y - 1)
    split = rng.choice(np.array(["train", "val", "test"]), size=n, p=[0.6, 0.2, 0.2])
    return SplitFeatures.from_arrays(image, text, y, split)


def test_focal_training_runs_and_differs_from_cross_entropy():
    data = imbalanced_modalities()
    _, ce = train_head("concat", data, TrainConfig(**FAST), 2)
    _, focal = train_head("concat", data, TrainConfig(**FAST, loss="focal", focal_gamma=2.0), 2)
    assert focal[0]["train_loss"] < ce[0]["train_loss"]  # every per-example term shrinks by (1 - p)^gamma
    assert max(h["val_macro_f1"] for h in focal) > 0.9


def test_ogm_coefficients_damp_only_the_dominant_modality():
    ki, kt = ogm_coefficients(40.0, 20.0, alpha=0.5)
    assert ki == pytest.approx(1 - math.tanh(0.5 * (2.0 - 1))) and ki < 1 and kt == 1.0
    ki, kt = ogm_coefficients(10.0, 30.0, alpha=1.0)
    assert ki == 1.0 and kt == pytest.approx(1 - math.tanh(1.0 * (3.0 - 1)))
    assert ogm_coefficients(5.0, 5.0, 0.5) == (1.0, 1.0)
    assert ogm_coefficients(50.0, 10.0, 2.0)[0] < ogm_coefficients(50.0, 10.0, 0.5)[0]  # stronger alpha, more damping


@pytest.mark.parametrize("name", ["concat", "add", "gated", "attention", "late"])
def test_modulate_scales_the_dominant_encoder_gradients(name):
    head = build_head(name, 8, 6, 2, TrainConfig(hidden_dim=16))
    cfg = TrainConfig(ogm_ge={"enabled": True, "alpha": 0.5, "gaussian_noise": False})
    balancer = ModalityBalancer.for_head(head, cfg)
    params = encoder_parameters(head)
    for p in head.parameters():
        p.grad = torch.ones_like(p)
    balancer.coeffs = (0.25, 1.0)
    balancer.modulate()
    for p, cols in params["image"]:
        grad = p.grad if cols is None else p.grad[:, cols]
        assert torch.all(grad == 0.25)
    for p, cols in params["text"]:
        grad = p.grad if cols is None else p.grad[:, cols]
        assert torch.all(grad == 1.0)
    # Parameters that see both modalities (the fused classifier) are never modulated.
    shared = [p for p in head.parameters() if all(p is not q for q, _ in params["image"] + params["text"])]
    assert all(torch.all(p.grad == 1.0) for p in shared)


def test_generalisation_noise_uses_the_gradient_scale():
    head = build_head("add", 8, 6, 2, TrainConfig(hidden_dim=16))
    balancer = ModalityBalancer.for_head(head, TrainConfig(ogm_ge={"enabled": True}))
    for p in head.parameters():
        p.grad = torch.randn_like(p) * 0.01
    before = head.image_proj.weight.grad.clone()
    balancer.coeffs = (0.5, 1.0)
    balancer.modulate()
    noise = head.image_proj.weight.grad - 0.5 * before
    assert 0.3 * before.std() < noise.std() < 3 * before.std()


def test_ogm_ge_training_logs_the_modality_contribution_per_epoch():
    data = imbalanced_modalities()
    cfg = TrainConfig(**FAST, ogm_ge={"enabled": True, "alpha": 1.0})
    _, history = train_head("add", data, cfg, 2)
    assert all({"score_image", "score_text", "ratio_image_text", "coeff_image", "coeff_text"} <= set(h)
               for h in history)
    late = history[1:]  # after the first epoch the image has won the race
    assert all(h["score_image"] > h["score_text"] for h in late)
    assert all(h["ratio_image_text"] > 1 and h["coeff_image"] < 1 and h["coeff_text"] == 1.0 for h in late)
    assert max(h["val_macro_f1"] for h in history) > 0.9
    # Off by default: the history keeps its four columns.
    _, plain = train_head("add", data, TrainConfig(**FAST), 2)
    assert set(plain[0]) == {"epoch", "train_loss", "val_loss", "val_macro_f1"}


def test_aux_loss_adds_unimodal_terms_and_is_logged():
    data = imbalanced_modalities()
    _, plain = train_head("concat", data, TrainConfig(**FAST), 2)
    _, aux = train_head("concat", data, TrainConfig(**FAST, aux_loss_weight=0.5), 2)
    assert all(h["aux_loss"] > 0 for h in aux)
    assert aux[0]["train_loss"] > plain[0]["train_loss"]  # the auxiliary terms are part of the training loss
    assert "coeff_image" not in aux[0]  # OGM-GE is off: no coefficients to report
    # Unimodal heads have no second modality to balance.
    assert ModalityBalancer.for_head(build_head("image_only", 8, 6, 2), TrainConfig(aux_loss_weight=1.0)) is None


def test_unimodal_logits_use_the_training_mean_for_the_other_modality():
    from crossmodal.training.modality import unimodal_logits

    head = build_head("concat", 8, 6, 2, TrainConfig(hidden_dim=16)).eval()
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(20, 8)).astype(np.float32), rng.normal(size=(20, 6)).astype(np.float32) + 3
    fit_standardizers(head, image, text)
    xi, xt = torch.from_numpy(image), torch.from_numpy(text)
    li, lt = unimodal_logits(head, xi, xt)
    with torch.no_grad():
        torch.testing.assert_close(li, head(xi, head.text_norm.mean.expand_as(xt)))
        torch.testing.assert_close(lt, head(head.image_norm.mean.expand_as(xi), xt))


def test_modality_contribution_reaches_mlflow_per_epoch(mlflow_store, tmp_path):
    from mlflow.tracking import MlflowClient

    from crossmodal.heads.files import save_head
    from crossmodal.registry import tracking

    data = imbalanced_modalities(n=200)
    head, history = train_head("gated", data, TrainConfig(**{**FAST, "max_epochs": 3},
                                                          ogm_ge={"enabled": True}), 2)
    head_dir = save_head(head, tmp_path / "gated", {"history": history, "best_epoch": 1, "epochs_run": 3})
    (tmp_path / "reports" / "plots").mkdir(parents=True)
    client = MlflowClient()
    experiment = client.create_experiment("ogm")
    parent = client.create_run(experiment).info.run_id
    rid = tracking.log_head_run(client, experiment, parent, "gated", head_dir, tmp_path / "reports", {})
    for key in ("score_image", "score_text", "ratio_image_text", "coeff_image", "coeff_text"):
        logged = client.get_metric_history(rid, f"epoch_{key}")
        assert [m.step for m in logged] == [1, 2, 3]  # steps are the epochs
        assert [m.value for m in logged] == pytest.approx([h[key] for h in history])
