"""Missing modalities and attribution: validation accepts or quarantines absent images/texts per setting, absent
inputs are never encoded, every head predicts from one modality, modality dropout makes that prediction good,
evaluation reports robustness and attribution, and the served model explains its predictions on request."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from crossmodal.config import TrainConfig, from_dict
from crossmodal.errors import TrainError
from crossmodal.evaluation.metrics import attribution_summary, compute_metrics
from crossmodal.evaluation.tables import robustness_table
from crossmodal.heads.common import Standardize, fill_missing
from crossmodal.heads.inference import predict_proba, without
from crossmodal.heads.registry import HEADS, build_head, fit_standardizers
from crossmodal.training.dataset import SplitFeatures
from crossmodal.training.loop import modality_dropout, train_head
from crossmodal.training.train import train_all
from crossmodal.validation.validate import validate_manifest
from tests.data_fixtures import good_rows, write_csv

# ---------------------------------------------------------------- validation


@pytest.fixture(scope="module")
def gappy_manifest(tmp_path_factory):
    """12 complete rows, and rows whose image, text or both are absent (null, blank or whitespace cells)."""
    root = tmp_path_factory.mktemp("gappy")
    rows = good_rows(root, 12)
    rows += [
        {"id": "no-image", "image": None, "text": "a caption without a picture", "label": "cat"},
        {"id": "blank-image", "image": "   ", "text": "another lonely caption", "label": "dog"},
        {"id": "no-text", "image": "images/ok1.jpg", "text": None, "label": "dog"},
        {"id": "blank-text", "image": "images/ok2.jpg", "text": " \u200b ", "label": "cat"},
        {"id": "neither", "image": "", "text": "", "label": "cat"},
    ]
    return write_csv(root / "manifest.csv", rows, ["id", "image", "text", "label"])


NO_IMAGE, NO_TEXT = {"no-image", "blank-image"}, {"no-text", "blank-text"}


@pytest.mark.parametrize("allow, kept_extra", [
    ("none", set()), ("image", NO_IMAGE), ("text", NO_TEXT), ("either", NO_IMAGE | NO_TEXT)])
def test_validation_keeps_absent_modalities_only_when_allowed(gappy_manifest, tmp_path, allow, kept_extra):
    cfg = from_dict({"validation": {"max_quarantine_fraction": 0.9, "allow_missing": allow}})
    res = validate_manifest(gappy_manifest, cfg, tmp_path)
    assert res.rows_in == 17 == res.rows_kept + res.rows_quarantined
    kept = pd.read_parquet(res.validated_path)
    assert set(kept["id"]) == {f"ok{k}" for k in range(12)} | kept_extra
    q = pd.read_csv(tmp_path / "quarantine.csv", dtype=str, keep_default_na=False).set_index("id")
    assert len(q) == res.rows_quarantined and set(q.index) | set(kept["id"]) == set(
        pd.read_csv(gappy_manifest)["id"])
    # A row with neither modality is never kept, and says why.
    assert q.loc["neither", "reason"].startswith("no image and no text")
    for rid in (NO_IMAGE | NO_TEXT) - kept_extra:
        assert rid in q.index and q.loc[rid, "reason"]
    # Absent means null in the validated table: no path, no hash, no text.
    for rid in kept_extra & NO_IMAGE:
        row = kept.set_index("id").loc[rid]
        assert pd.isna(row["image"]) and pd.isna(row["image_sha256"]) and row["text"]
    for rid in kept_extra & NO_TEXT:
        row = kept.set_index("id").loc[rid]
        assert pd.isna(row["text"]) and row["image_sha256"]
    report = json.loads(res.report_path.read_text())
    assert report["allow_missing"] == allow
    assert report["rows_missing_image"] == len(kept_extra & NO_IMAGE)
    assert report["rows_missing_text"] == len(kept_extra & NO_TEXT)


def test_unknown_allow_missing_value_is_a_config_error():
    from crossmodal.errors import ConfigError

    with pytest.raises(ConfigError, match="validation.allow_missing"):
        from_dict({"validation": {"allow_missing": "both"}})
    with pytest.raises(ConfigError, match="train.modality_dropout"):
        from_dict({"train": {"modality_dropout": 1.0}})


# ---------------------------------------------------------------- extraction


def test_absent_inputs_are_never_encoded(gappy_manifest, tmp_path, monkeypatch):
    from crossmodal.features import extractor as embed
    from crossmodal.features.extract import extract_features

    cfg = from_dict({"validation": {"max_quarantine_fraction": 0.9, "allow_missing": "either"},
                     "encoders": {"image": {"image_size": 64}, "text": {"max_length": 32}}})
    res = validate_manifest(gappy_manifest, cfg, tmp_path / "v")
    df = pd.read_parquet(res.validated_path)
    seen = {"image": [], "text": []}
    real_images, real_texts = embed.FeatureExtractor.iter_image_features, embed.FeatureExtractor.iter_text_features

    def spy_images(self, sources, *args, **kwargs):
        seen["image"] += list(sources)
        return real_images(self, sources, *args, **kwargs)

    def spy_texts(self, texts, *args, **kwargs):
        seen["text"] += list(texts)
        return real_texts(self, texts, *args, **kwargs)

    monkeypatch.setattr(embed.FeatureExtractor, "iter_image_features", spy_images)
    monkeypatch.setattr(embed.FeatureExtractor, "iter_text_features", spy_texts)
    feats = extract_features(res.validated_path, cfg.encoders, tmp_path / "cache", progress=False)
    img, txt = np.load(feats.image_path), np.load(feats.text_path)
    assert None not in seen["image"] and None not in seen["text"] and "" not in seen["text"]
    assert len(seen["image"]) == df["image_sha256"].dropna().nunique()
    no_img, no_txt = df["image"].isna().to_numpy(), df["text"].isna().to_numpy()
    assert no_img.sum() == 2 and no_txt.sum() == 2
    assert np.isnan(img[no_img]).all() and np.isfinite(img[~no_img]).all()
    assert np.isnan(txt[no_txt]).all() and np.isfinite(txt[~no_txt]).all()
    # The absent rows are part of the cache key: the same table with those rows complete is another entry.
    from crossmodal.features.extract import feature_keys

    filled = df.assign(text=df["text"].fillna("something"))
    assert feature_keys(filled, cfg.encoders, "fp32")["text"] != feature_keys(df, cfg.encoders, "fp32")["text"]


# ---------------------------------------------------------------- heads


def test_fill_missing_and_standardize_ignore_absent_rows():
    x = torch.tensor([[1.0, 2.0], [float("nan")] * 2, [3.0, 6.0]])
    placeholder = torch.nn.Parameter(torch.tensor([9.0, 9.0]))
    filled = fill_missing(x, placeholder)
    assert filled.tolist() == [[1.0, 2.0], [9.0, 9.0], [3.0, 6.0]]
    filled.sum().backward()
    assert placeholder.grad.tolist() == [1.0, 1.0]  # the placeholder learns from the rows it stands in for
    norm = Standardize(2).fit(x.numpy())
    assert norm.mean.tolist() == [2.0, 4.0] and norm.std.tolist() == [1.0, 2.0]
    with pytest.raises(ValueError, match="every training row lacks this modality"):
        Standardize(2).fit(np.full((3, 2), np.nan))


@pytest.mark.parametrize("name", list(HEADS))
def test_every_head_predicts_with_either_modality_absent(name):
    rng = np.random.default_rng(0)
    image, text = rng.normal(size=(8, 6)).astype(np.float32) * 5 + 3, rng.normal(size=(8, 4)).astype(np.float32)
    head = fit_standardizers(build_head(name, 6, 4, 3, hidden_dim=16), image, text).eval()
    for kind in ("image", "text"):
        placeholder = getattr(head, f"{kind}_missing", None)
        if placeholder is not None:  # starts as the training mean: standardises to zero
            np.testing.assert_allclose(placeholder.detach().numpy(), (image if kind == "image" else text).mean(0),
                                       rtol=1e-5, atol=1e-6)
    image[2], text[5] = np.nan, np.nan
    for a, b in ((image, text), (without(image), text), (image, without(text))):
        p = predict_proba(head, a, b)
        assert np.isfinite(p).all() and np.allclose(p.sum(1), 1, atol=1e-5)


def test_modality_dropout_never_hides_both():
    g = torch.Generator().manual_seed(0)
    image, text = torch.ones(20000, 3), torch.ones(20000, 2)
    text[:1000] = float("nan")  # already missing text: their image must stay
    di, dt = modality_dropout(image, text, 0.4, g)
    gone_i, gone_t = torch.isnan(di).all(1), torch.isnan(dt).all(1)
    assert not (gone_i & gone_t).any()
    assert not gone_i[:1000].any()
    rate = 0.4 - 0.4**2 / 2  # a coin decides when both are drawn
    assert abs(gone_i[1000:].float().mean().item() - rate) < 0.02
    assert abs(gone_t[1000:].float().mean().item() - rate) < 0.02
    assert modality_dropout(image, text, 0.0, g)[0] is image


def demo_like(n=900, seed=1) -> SplitFeatures:
    """Three classes, as in the demo, but both modalities informative on their own: the caption's sentiment
    (positive / negative / neutral; the neutral class sits at the text features' mean) and the picture's mood.
    Text is the stronger signal, so a head trained on complete rows leans on it."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    image = rng.normal(size=(n, 32)) * 3 + 10 + 0.75 * rng.normal(size=(3, 32))[y]
    text = rng.normal(size=(n, 24)) * 0.05
    text[:, 0] += 0.15 * np.array([1.0, -1.0, 0.0])[y]
    split = rng.choice(np.array(["train", "val", "test"]), size=n, p=[0.6, 0.2, 0.2])
    return SplitFeatures.from_arrays(image, text, y, split)


@pytest.fixture(scope="module")
def demo_task() -> SplitFeatures:
    return demo_like()


@pytest.mark.parametrize("name", ["gated", "attention"])
def test_modality_dropout_degrades_gracefully(demo_task, name):
    d = demo_task
    fast = dict(hidden_dim=32, dropout=0.1, lr=1e-2, batch_size=64, max_epochs=60, patience=15)

    def scores(rate):
        head, _ = train_head(name, d, TrainConfig(**fast, modality_dropout=rate), num_classes=3)
        ti, tt = d.image["test"], d.text["test"]
        return {k: compute_metrics(d.y["test"], predict_proba(head, a, b), ["pos", "neg", "neu"])["macro_f1"]
                for k, (a, b) in {"full": (ti, tt), "no_text": (ti, without(tt)), "no_image": (without(ti), tt)}.items()}

    plain, dropped = scores(0.0), scores(0.3)
    # Chance macro-F1 is about 0.33 on three balanced classes.
    assert dropped["no_text"] > 0.55, dropped
    assert dropped["no_text"] > plain["no_text"] + 0.15, (plain, dropped)
    assert dropped["no_image"] > 0.7, dropped
    assert dropped["full"] > plain["full"] - 0.05, (plain, dropped)


def test_late_fusion_uses_the_present_modality_alone():
    head = build_head("late", 3, 2, 2, hidden_dim=8).eval()
    head.image_weight.fill_(0.0)  # on complete rows only the text counts
    image, text = torch.randn(4, 3), torch.randn(4, 2)
    no_text = torch.full_like(text, float("nan"))
    with torch.no_grad():
        p = torch.softmax(head(image, no_text), 1)
        alone = torch.softmax(head.image_classifier(head.image_norm(image)), 1)
    torch.testing.assert_close(p, alone)


# ---------------------------------------------------------------- training files


def test_train_all_accepts_absent_rows_and_writes_robustness_outputs(tmp_path):
    rng = np.random.default_rng(0)
    n = 90
    y = np.arange(n) % 3
    image, text = rng.normal(size=(n, 6)).astype(np.float32), rng.normal(size=(n, 4)).astype(np.float32)
    image[::7], text[1::7] = np.nan, np.nan  # never both in one row
    split = np.array(["train", "val", "test"])[np.arange(n) % 5 % 3]
    df = pd.DataFrame({"id": [f"r{i}" for i in range(n)], "label": np.array(["a", "b", "c"])[y], "split": split})
    df.to_parquet(tmp_path / "v.parquet")
    np.save(tmp_path / "i.npy", image)
    np.save(tmp_path / "t.npy", text)
    cfg = TrainConfig(heads=["concat", "gated"], hidden_dim=16, max_epochs=2, modality_dropout=0.3)
    train_all(tmp_path / "v.parquet", tmp_path / "i.npy", tmp_path / "t.npy", cfg, tmp_path / "out")
    n_test = int((split == "test").sum())
    for name in cfg.heads:
        with np.load(tmp_path / "out" / name / "predictions.npz") as npz:
            for key in ("test_proba_missing_text", "test_proba_missing_image"):
                assert npz[key].shape == (n_test, 3) and np.isfinite(npz[key]).all()
            assert ("test_gate" in npz.files) == (name == "gated")
            if name == "gated":
                assert npz["test_gate"].shape == (n_test, 2)
                np.testing.assert_allclose(npz["test_gate"].sum(1), 1, atol=1e-5)
    both = text.copy()
    both[0] = np.nan  # row 0 has no image either
    np.save(tmp_path / "t2.npy", both)
    with pytest.raises(TrainError, match="'r0' has neither image nor text"):
        train_all(tmp_path / "v.parquet", tmp_path / "i.npy", tmp_path / "t2.npy", cfg, tmp_path / "out")


# ---------------------------------------------------------------- evaluation


def test_attribution_summary_by_hand():
    y = np.array([0, 0, 1])
    full = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]])
    no_image = np.array([[0.5, 0.5], [0.6, 0.4], [0.4, 0.6]])
    no_text = np.array([[0.8, 0.2], [0.3, 0.7], [0.5, 0.5]])
    gates = np.array([[0.2, 0.8], [0.4, 0.6], [0.6, 0.4]])
    out = attribution_summary(y, full, ["a", "b"], no_image, no_text, gates)
    a, b = out["per_class"]["a"], out["per_class"]["b"]
    assert a["n"] == 2 and b["n"] == 1
    assert a["image"] == pytest.approx((0.4 + 0.0) / 2) and a["text"] == pytest.approx((0.1 + 0.3) / 2)
    assert b["image"] == pytest.approx(0.2) and b["text"] == pytest.approx(0.3)
    assert a["gate_image"] == pytest.approx(0.3) and b["gate_text"] == pytest.approx(0.4)
    assert out["overall"]["n"] == 3
    assert attribution_summary(y, full, ["a", "b"], None, None) is None


def test_evaluation_reports_robustness_and_attribution(tiny_run):
    metrics = tiny_run["metrics"]
    labels = metrics["labels"]
    for name, m in metrics["heads"].items():
        for block in ("missing_text", "missing_image"):
            assert set(m[block]) == set(m["test"]) and m[block]["n"] == m["test"]["n"], (name, block)
        attribution = m["attribution"]
        assert set(attribution["per_class"]) == set(labels)
        assert {"image", "text"} <= set(attribution["overall"])
        assert ("gate_image" in attribution["overall"]) == (name == "gated")
    # A unimodal head loses nothing when the other modality goes, and everything it knows when its own goes.
    text_only = metrics["heads"]["text_only"]
    assert text_only["missing_image"]["macro_f1"] == pytest.approx(text_only["test"]["macro_f1"])
    assert text_only["attribution"]["overall"]["image"] == pytest.approx(0.0, abs=1e-6)
    table = (tiny_run["reports"] / "robustness.md").read_text()
    assert table.strip() == robustness_table(metrics)
    assert all(f"| {name} |" in table for name in metrics["heads"])
    assert "without text" in table and "without image" in table


# ---------------------------------------------------------------- the served model


def test_pyfunc_predicts_from_one_modality_and_explains_on_request(tiny_run, mlflow_store):
    import mlflow
    from crossmodal.serving import package

    frame = pd.read_parquet(tiny_run["validated_dir"] / "validated.parquet")
    test = frame[frame["split"] == "test"].reset_index(drop=True)
    with mlflow.start_run():
        info = package.log_model(tiny_run["models"], "gated", tiny_run["cfg"], test)
    assert info.signature.params.to_dict()[0]["name"] == "attribution"
    model = mlflow.pyfunc.load_model(info.model_uri)
    image_bytes = [Path(test["image"][0]).read_bytes(), None, Path(test["image"][2]).read_bytes()]
    rows = pd.DataFrame({"image_bytes": image_bytes, "text": [test["text"][0], test["text"][1], None]})
    plain = model.predict(rows)
    labels = tiny_run["metrics"]["labels"]
    assert list(plain.columns) == ["label"] + [f"prob_{c}" for c in labels]
    assert plain.filter(like="prob_").sum(axis=1).round(5).eq(1).all()
    explained = model.predict(rows, params={"attribution": True})
    assert list(explained.columns) == list(plain.columns) + ["attr_image", "attr_text", "gate_image", "gate_text"]
    pd.testing.assert_frame_equal(explained[plain.columns], plain)
    assert explained.loc[1, "attr_image"] == pytest.approx(0.0, abs=1e-6)  # no image to remove
    assert explained.loc[2, "attr_text"] == pytest.approx(0.0, abs=1e-6)
    assert (explained[["gate_image", "gate_text"]].sum(axis=1) - 1).abs().max() < 1e-5
    assert np.isfinite(explained[["attr_image", "attr_text"]].to_numpy()).all()
    # Only a text column at all: still a prediction.
    only_text = model.predict(pd.DataFrame({"text": [test["text"][1]]}))
    assert only_text["label"].iloc[0] in labels
    assert only_text.loc[0, "label"] == plain.loc[1, "label"]


def test_fused_model_rejects_rows_with_nothing(tiny_run, tmp_path):
    from crossmodal.errors import PredictionInputError
    from crossmodal.serving.fused_model import FusedModel
    from crossmodal.serving.package import save_model_dir

    model = FusedModel.load(save_model_dir(tiny_run["models"], "concat", tiny_run["cfg"].encoders, tmp_path / "m"))
    with pytest.raises(PredictionInputError, match=r"row 1: no image and no text"):
        model.predict(pd.DataFrame({"image": [None, None], "text": ["hello", "   "]}))
    with pytest.raises(PredictionInputError, match="'text' column, an 'image'"):
        model.predict(pd.DataFrame({"caption": ["hello"]}))


@pytest.mark.slow
def test_demo_chain_keeps_a_row_without_caption(demo_dir, tmp_path):
    """validate -> extract -> train -> evaluate on the tiny demo with allow_missing=either: its blank-caption
    row is kept, its text features are NaN, and every head is trained and scored with and without each modality."""
    from crossmodal.evaluation.evaluate import evaluate_all
    from crossmodal.features.extract import extract_features
    from tests.conftest import tiny_config

    cfg = tiny_config(tmp_path, validation={"allow_missing": "either"}, train={"modality_dropout": 0.3})
    res = validate_manifest(demo_dir / "manifest.csv", cfg, tmp_path / "validated")
    kept = pd.read_parquet(res.validated_path)
    assert "bad-empty-caption" in set(kept["id"]) and res.rows_in == res.rows_kept + res.rows_quarantined
    feats = extract_features(res.validated_path, cfg.encoders, tmp_path / "cache", progress=False)
    row = int(np.flatnonzero(kept["id"].to_numpy() == "bad-empty-caption")[0])
    assert np.isnan(np.load(feats.text_path)[row]).all() and np.isfinite(np.load(feats.image_path)[row]).all()
    train_all(res.validated_path, feats.image_path, feats.text_path, cfg.train, tmp_path / "models")
    metrics = evaluate_all(tmp_path / "models", tmp_path / "reports")
    assert set(metrics["heads"]) == set(cfg.train.heads)
    assert all(m["missing_text"] and m["missing_image"] for m in metrics["heads"].values())


def test_modality_dropout_leaves_unimodal_and_late_heads_alone(demo_task):
    fast = dict(hidden_dim=16, max_epochs=3, patience=3)
    for name in ("text_only", "late"):
        plain, _ = train_head(name, demo_task, TrainConfig(**fast), num_classes=3)
        dropped, _ = train_head(name, demo_task, TrainConfig(**fast, modality_dropout=0.5), num_classes=3)
        for a, b in zip(plain.state_dict().values(), dropped.state_dict().values()):
            torch.testing.assert_close(a, b)


def test_cli_options_reach_the_config(gappy_manifest, tmp_path):
    from typer.testing import CliRunner

    from crossmodal.cli import app

    runner = CliRunner()
    base = ["validate", "--manifest", str(gappy_manifest), "--params", str(tmp_path / "none.yaml")]
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "a"), "--allow-missing", "sometimes"])
    assert bad.exit_code == 2 and "validation.allow_missing" in bad.output and "Traceback" not in bad.output
    ok = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--allow-missing", "either"])
    assert ok.exit_code == 0, ok.output
    assert "17 in = 16 kept + 1 quarantined" in ok.output
