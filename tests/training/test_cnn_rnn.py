"""Training the cnn_rnn head (crossmodal.training.cnn_rnn) as a task of the train stage: on a tiny table whose texts
name the label in words, it beats chance; its folder follows the head contract, its saved weights give the
predictions it wrote, and a second run gives the same to the bit. The head itself: tests/heads/test_cnn_rnn.py;
served from raw rows: tests/serving/test_cnn_rnn_serving.py."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import f1_score

from crossmodal.config import EncodersConfig, TrainConfig
from crossmodal.training.train import train_all

WORDS = {"cat": ["cat", "kitten", "tabby"], "dog": ["dog", "puppy", "hound"], "bird": ["bird", "sparrow", "parrot"]}
SETTINGS = {"epochs": 12, "hidden": 16, "patience": 4, "batch_size": 16}


def _inputs(save, root, n=150, seed=0):
    """validated.parquet with texts, image.npy (weakly telling the label), text.npy; one train row without text
    and one without image."""
    rng = np.random.default_rng(seed)
    labels = sorted(WORDS)
    y = rng.integers(0, 3, n)
    texts = [f"a {rng.choice(['small', 'sleepy', 'loud'])} {rng.choice(WORDS[labels[k]])} number {i}"
             for i, k in enumerate(y)]
    image = (rng.normal(size=(n, 10)) + 0.5 * np.eye(3, 10)[y]).astype(np.float32)
    text = rng.normal(size=(n, 6)).astype(np.float32)
    split = np.array(["train", "val", "test"])[np.arange(n) % 5 % 3]
    texts[0], text[0] = None, np.nan  # row 0 (train): no text
    image[5] = np.nan  # row 5 (train): no image
    df = pd.DataFrame({"id": [f"id{i}" for i in range(n)], "label": [labels[k] for k in y], "split": split,
                       "text": texts})
    return save(root, df, image, text), df


@pytest.fixture(scope="module")
def trained(tmp_path_factory, save_inputs):
    root = tmp_path_factory.mktemp("cnn_rnn")
    paths, df = _inputs(save_inputs, root)
    cfg = TrainConfig(heads=["concat", "cnn_rnn"], max_epochs=5, cnn_rnn=SETTINGS)
    result = train_all(*paths, cfg, root / "models", EncodersConfig(), progress_dir=root / "progress")
    return {"root": root, "paths": paths, "df": df, "cfg": cfg, "result": result, "dir": root / "models" / "cnn_rnn"}


def test_it_trains_as_a_task_and_beats_chance(trained):
    result = trained["result"]
    assert result.heads == ["concat", "cnn_rnn"]
    assert result.tasks[0]["name"] == "train-cnn_rnn"  # the costliest task starts first
    with np.load(trained["dir"] / "predictions.npz") as npz:
        pred = {k: npz[k] for k in npz.files}
    assert set(pred) == {"val_proba", "test_proba", "val_y", "test_y", "val_ids", "test_ids",
                         "test_proba_missing_text", "test_proba_missing_image"}
    assert f1_score(pred["test_y"], pred["test_proba"].argmax(1), average="macro") > 0.6  # chance: about 0.33
    # The text names the label; without it the (weak) image branch alone decides, and does worse.
    f1_without_text = f1_score(pred["test_y"], pred["test_proba_missing_text"].argmax(1), average="macro")
    assert f1_without_text < f1_score(pred["test_y"], pred["test_proba_missing_image"].argmax(1), average="macro")
    test = trained["df"][trained["df"]["split"] == "test"]
    assert pred["test_ids"].tolist() == test["id"].tolist()


def test_folder_follows_the_head_contract(trained):
    meta = json.loads((trained["dir"] / "head.json").read_text())
    assert meta["name"] == "cnn_rnn" and meta["modality"] == "fusion" and meta["family"] == "rnn"
    args = meta["init_args"]
    assert (args["fusion"], args["rnn"], args["hidden"], args["text_encoder"]) == ("weighted_sum", "gru", 16,
                                                                                   "all-MiniLM-L6-v2")
    assert 1 <= meta["best_epoch"] <= meta["epochs_run"] == len(meta["history"]) <= SETTINGS["epochs"]
    lines = (trained["root"] / "progress" / "cnn_rnn.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == list(range(1, meta["epochs_run"] + 1))
    # The RNN, MLPs and fusion only: the 30522 x 384 word-embedding table is not saved.
    assert (trained["dir"] / "weights.safetensors").stat().st_size < 1_000_000


def test_saved_weights_and_a_second_run_give_the_same_predictions(trained, tmp_path):
    from crossmodal.encoders.registry import load_text_encoder
    from crossmodal.heads.cnn_rnn import load_cnn_rnn, predict_proba, tokenize
    from crossmodal.training.cnn_rnn import save_cnn_rnn, train_cnn_rnn
    from crossmodal.training.dataset import load_split_features

    expected = np.load(trained["dir"] / "predictions.npz")["test_proba"]
    encoder = load_text_encoder("all-MiniLM-L6-v2", "cpu")
    head = load_cnn_rnn(trained["dir"], encoder)
    data, labels = load_split_features(*trained["paths"])
    test = trained["df"][trained["df"]["split"] == "test"]
    ids, mask = tokenize(encoder.tokenizer, test["text"].tolist(), head.init_args["max_length"])
    np.testing.assert_array_equal(predict_proba(head, data.image["test"], ids, mask), expected)

    again = train_cnn_rnn(trained["paths"][0], data, trained["cfg"], EncodersConfig(), len(labels))
    save_cnn_rnn(again, data, labels, trained["cfg"], tmp_path)
    np.testing.assert_array_equal(np.load(tmp_path / "cnn_rnn" / "predictions.npz")["test_proba"], expected)


def test_mlp_fusion_and_lstm_train_too(trained, tmp_path):
    from crossmodal.training.cnn_rnn import train_cnn_rnn
    from crossmodal.training.dataset import load_split_features

    data, labels = load_split_features(*trained["paths"])
    cfg = TrainConfig(cnn_rnn={**SETTINGS, "fusion": "mlp", "rnn": "lstm", "epochs": 3})
    out = train_cnn_rnn(trained["paths"][0], data, cfg, EncodersConfig(), len(labels))
    assert out.head.init_args["fusion"] == "mlp" and len(out.history) <= 3
    assert isinstance(out.head.rnn, torch.nn.LSTM) and not hasattr(out.head, "fusion_weight")


def test_weighted_sum_weights_are_learned(trained):
    from crossmodal.heads.cnn_rnn import load_cnn_rnn

    weights = load_cnn_rnn(trained["dir"]).fusion_weight.detach()
    assert weights.shape == (2, 3) and not bool((weights == 0).all())  # they start at 0 (equal weights)


def test_evaluation_ranks_it_with_the_fusion_heads(trained, tmp_path):
    from crossmodal.evaluation.evaluate import evaluate_all

    metrics = evaluate_all(trained["root"] / "models", tmp_path / "reports")
    head = metrics["heads"]["cnn_rnn"]
    assert head["modality"] == "fusion" and head["family"] == "rnn"
    assert head["missing_text"] is not None and head["missing_image"] is not None
    assert metrics["best_fusion"] in ("cnn_rnn", "concat")
    from crossmodal.registry.descriptions import version_description

    described = version_description(metrics, "cnn_rnn", {"promoted": False, "reason": "not better"})
    assert "an RNN on the text encoder's word pieces" in described
