"""Fusion heads: registry, shapes, standardisation, save/load round trip, head-specific behaviour."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from crossmodal.config import ENSEMBLE_HEADS, FINETUNED_HEADS, HEAD_NAMES, RNN_HEADS, TRADITIONAL_HEADS, TrainConfig
from crossmodal.errors import TrainError
from crossmodal.heads.attention import NUM_HEADS, model_dim_for
from crossmodal.heads.common import Standardize
from crossmodal.heads.files import load_head, save_head
from crossmodal.heads.registry import HEADS, build_head, fit_standardizers

DI, DT = 20, 12
MODULE_HEADS = tuple(HEADS)  # the nn.Module heads; traditional baselines are scikit-learn models


def _features(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Very different scales on purpose: CNN-like image features vs small text features.
    return torch.randn(n, DI, generator=g) * 30 + 5, torch.randn(n, DT, generator=g) * 0.05


def test_registry_matches_config_and_declares_modality():
    assert set(HEADS) == (set(HEAD_NAMES) - set(TRADITIONAL_HEADS) - set(FINETUNED_HEADS) - set(ENSEMBLE_HEADS)
                          - set(RNN_HEADS))
    assert HEADS["image_only"].modality == "image"
    assert HEADS["text_only"].modality == "text"
    assert {HEADS[n].modality for n in MODULE_HEADS if n not in ("image_only", "text_only")} == {"fusion"}


@pytest.mark.parametrize("num_classes", [2, 3])
@pytest.mark.parametrize("name", MODULE_HEADS)
def test_head_forward_shape_and_init_args(name, num_classes):
    head = build_head(name, DI, DT, num_classes, TrainConfig(hidden_dim=16, dropout=0.1)).eval()
    image, text = _features()
    fit_standardizers(head, image.numpy(), text.numpy())
    logits = head(image, text)
    assert logits.shape == (len(image), num_classes)
    assert torch.isfinite(logits).all()
    args = json.loads(json.dumps(head.init_args))  # JSON-able
    assert args["name"] == name and args["num_classes"] == num_classes and args["hidden_dim"] == 16
    rebuilt = build_head(**args)
    assert type(rebuilt) is type(head)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in head.state_dict().items()}


@pytest.mark.parametrize("name", MODULE_HEADS)
def test_save_load_round_trip_gives_identical_outputs(name, tmp_path):
    torch.manual_seed(1)
    head = build_head(name, DI, DT, 3, TrainConfig(hidden_dim=16))
    image, text = _features()
    fit_standardizers(head, image.numpy(), text.numpy())
    if name == "late":
        head.image_weight.fill_(0.3)  # a fitted buffer must survive the round trip too
    head.eval()
    save_head(head, tmp_path / name, {"best_epoch": 4})
    assert (tmp_path / name / "weights.safetensors").is_file()
    meta = json.loads((tmp_path / name / "head.json").read_text())
    assert meta["name"] == name and meta["modality"] == head.modality and meta["best_epoch"] == 4
    loaded = load_head(tmp_path / name)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(head(image, text), loaded(image, text))
    for key, value in head.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_every_head_standardises_each_modality_it_reads():
    image, text = _features()
    for name in MODULE_HEADS:
        if name == "stacking":
            continue  # its two unimodal heads standardise their own input (tests/training/test_stacking.py)
        head = fit_standardizers(build_head(name, DI, DT, 2), image.numpy(), text.numpy())
        keys = set(head.state_dict())
        reads_image, reads_text = name != "text_only", name != "image_only"
        assert ("image_norm.mean" in keys) == reads_image and ("text_norm.std" in keys) == reads_text, name
        if reads_image:
            assert torch.allclose(head.image_norm.mean, image.mean(0), atol=1e-4)


def test_standardize_fits_and_handles_constant_columns():
    x = np.random.default_rng(0).normal(7.0, 40.0, size=(200, 5)).astype(np.float32)
    x[:, 4] = 3.0  # constant column: std 0 must not turn unseen values into inf
    norm = Standardize(5).fit(x)
    z = norm(torch.from_numpy(x))
    assert torch.allclose(z[:, :4].mean(0), torch.zeros(4), atol=1e-4)
    assert torch.allclose(z[:, :4].std(0, unbiased=False), torch.ones(4), atol=1e-4)
    assert norm.std[4] == 1.0
    assert torch.isfinite(norm(torch.full((1, 5), 1e3))).all()
    with pytest.raises(ValueError, match=r"\(N, 5\)"):
        norm.fit(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="zero rows"):
        norm.fit(np.zeros((0, 5)))


def test_build_head_rejects_bad_arguments():
    with pytest.raises(ValueError, match="unknown fusion head 'bilinear'.*concat"):
        build_head("bilinear", DI, DT, 2)
    with pytest.raises(ValueError, match="at least 2 classes"):
        build_head("concat", DI, DT, 1)
    with pytest.raises(ValueError, match="positive"):
        build_head("concat", 0, DT, 2)


def test_gated_exposes_per_sample_modality_weights():
    head = build_head("gated", DI, DT, 3, TrainConfig(hidden_dim=16)).eval()
    image, text = _features(n=7)
    logits, gates = head(image, text, return_gates=True)
    assert logits.shape == (7, 3) and gates.shape == (7, 2)
    assert torch.allclose(gates.sum(1), torch.ones(7))
    assert (gates >= 0).all()
    assert torch.equal(head.last_gates, gates.detach())
    assert torch.equal(head(image, text), logits)  # return_gates changes only what is returned


@pytest.mark.parametrize("w", [0.0, 0.3, 1.0])
def test_late_forward_is_log_of_weighted_average_of_probabilities(w):
    head = build_head("late", DI, DT, 3, TrainConfig(hidden_dim=16)).eval()
    head.image_weight.fill_(w)
    image, text = _features()
    with torch.no_grad():
        li, lt = head.unimodal_logits(image, text)
        expected = w * torch.softmax(li, 1) + (1 - w) * torch.softmax(lt, 1)
        out = head(image, text)
    assert torch.isfinite(out).all()
    assert torch.allclose(torch.softmax(out, 1), expected, atol=1e-6)
    assert torch.allclose(out.exp().sum(1), torch.ones(len(image)), atol=1e-5)


def test_late_loss_is_sum_of_the_two_unimodal_losses():
    head = build_head("late", DI, DT, 2, TrainConfig(hidden_dim=16)).eval()
    image, text = _features()
    y = torch.arange(len(image)) % 2
    criterion = torch.nn.CrossEntropyLoss()
    li, lt = head.unimodal_logits(image, text)
    assert torch.allclose(head.loss(image, text, y, criterion), criterion(li, y) + criterion(lt, y))


def test_late_fit_on_validation_prefers_the_informative_modality():
    # Hand-set classifiers: the text classifier reads the label, the image classifier is noise.
    head = build_head("late", 2, 2, 2, TrainConfig(hidden_dim=8, dropout=0.0)).eval()
    y = torch.arange(100) % 2
    text = torch.stack([y.float() * 2 - 1, torch.zeros(100)], 1)
    image = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for clf, scale in ((head.text_classifier, 5.0), (head.image_classifier, 0.5)):
            clf[0].weight.zero_(), clf[0].bias.zero_(), clf[3].weight.zero_(), clf[3].bias.zero_()
            clf[0].weight[0, 0], clf[0].weight[1, 0] = scale, -scale  # unit 0 fires for +x0, unit 1 for -x0
            clf[3].weight[1, 0], clf[3].weight[0, 1] = 1.0, 1.0
    w = head.fit_on_validation(image, text, y)
    assert w == pytest.approx(float(head.image_weight))
    assert w < 0.5


@pytest.mark.parametrize("hidden", [8, 30, 64, 256])
def test_attention_model_dim_fits_the_heads(hidden):
    d = model_dim_for(hidden)
    assert d % NUM_HEADS == 0 and 8 <= d <= max(hidden, 8)
    assert build_head("attention", DI, DT, 2, hidden_dim=hidden).model_dim == d


def test_load_head_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="head.json"):
        load_head(tmp_path / "nothing")
    head = build_head("concat", DI, DT, 2, hidden_dim=8)
    save_head(head, tmp_path / "h")
    meta = json.loads((tmp_path / "h" / "head.json").read_text())
    meta["init_args"]["hidden_dim"] = 16  # weights no longer match the description
    (tmp_path / "h" / "head.json").write_text(json.dumps(meta))
    with pytest.raises(TrainError, match="does not match"):
        load_head(tmp_path / "h")


@pytest.mark.parametrize("pooling", ["mean", "log_mean"])
def test_an_ensemble_pools_its_members_at_their_temperatures_and_reloads(pooling, tmp_path):
    from crossmodal.heads.averaged import pool_probabilities
    from crossmodal.heads.registry import ensemble_of

    torch.manual_seed(0)
    members = [build_head(n, 5, 4, 3, hidden_dim=8).eval() for n in ("concat", "gated")]
    image, text = torch.randn(6, 5), torch.randn(6, 4)
    weights, temperatures = [0.25, 0.75], [2.0, 0.5]
    head = ensemble_of(members, weights, temperatures, pooling)
    with torch.no_grad():
        probas = [torch.softmax(m(image, text), 1).double().numpy() for m in members]
        got = torch.softmax(head(image, text), 1).numpy()
    tempered = [p ** (1 / t) / (p ** (1 / t)).sum(1, keepdims=True) for p, t in zip(probas, temperatures)]
    if pooling == "mean":
        expected = sum(w * p for w, p in zip(weights, tempered))
    else:
        expected = np.prod([p ** w for w, p in zip(weights, tempered)], axis=0)
        expected /= expected.sum(1, keepdims=True)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(pool_probabilities(probas, weights, temperatures, pooling), expected, atol=1e-5)
    save_head(head, tmp_path / "ensemble", {})
    with torch.no_grad():
        np.testing.assert_allclose(torch.softmax(load_head(tmp_path / "ensemble")(image, text), 1).numpy(), got,
                                   atol=1e-6)


def test_an_ensemble_saved_without_a_pooling_is_the_plain_average():
    # What ensembles saved before temperatures and pooling were recorded hold: members and weights only.
    torch.manual_seed(1)
    members = [build_head(n, 5, 4, 3, hidden_dim=8).eval() for n in ("concat", "late")]
    head = build_head("ensemble", 5, 4, 3, members=[m.init_args for m in members], weights=[0.5, 0.5])
    assert head.init_args["pooling"] == "mean" and head.init_args["temperatures"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="unknown pooling"):
        build_head("ensemble", 5, 4, 3, members=[m.init_args for m in members], weights=[0.5, 0.5], pooling="max")
    # The same for an ensemble with members on other inputs (its init_args name them with their weights).
    from crossmodal.heads.averaged import EnsembleChoice

    old = EnsembleChoice.from_init_args({"name": "ensemble", "members": {"gated": 0.5, "cnn_rnn": 0.5}})
    assert old == EnsembleChoice({"gated": 0.5, "cnn_rnn": 0.5}, {"gated": 1.0, "cnn_rnn": 1.0}, "mean")
    new = EnsembleChoice({"gated": 0.5, "cnn_rnn": 0.5}, {"gated": 1.4, "cnn_rnn": 0.8}, "log_mean")
    assert EnsembleChoice.from_init_args(new.init_args()) == new
