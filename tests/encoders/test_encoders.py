"""Encoders: the offline defaults carry real pretrained weights; other names fail with errors a user can act on."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from crossmodal.data.images import image_to_tensor
from crossmodal.encoders.image import lite0_weights_path
from crossmodal.encoders.registry import canonical_name, load_image_encoder, load_text_encoder
from crossmodal.errors import EncoderUnavailable, UnknownEncoder

PALACE = 698  # ImageNet-1k class index of "palace"


@pytest.fixture(scope="module")
def lite0():
    return load_image_encoder("efficientnet_lite0", "cpu")


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder("all-MiniLM-L6-v2", "cpu")


def _normalise(x: torch.Tensor, enc) -> torch.Tensor:
    mean = torch.tensor(enc.mean).view(1, 3, 1, 1)
    std = torch.tensor(enc.std).view(1, 3, 1, 1)
    return (x.float() / 255 - mean) / std


def test_lite0_has_pretrained_imagenet_weights(lite0):
    """The pooled features, put through the package's own ImageNet classifier, recognise a palace photo.

    Random weights give a flat distribution (top probability ~0.016); the real ones say "palace" (~0.3).
    """
    from PIL import Image
    from sklearn.datasets import load_sample_image

    assert lite0.dim == 1280 and lite0.mean == (0.5, 0.5, 0.5) and lite0.std == (0.5, 0.5, 0.5)
    assert not lite0.module.training
    img = Image.fromarray(load_sample_image("china.jpg"))
    x = _normalise(image_to_tensor(img, 224).unsqueeze(0), lite0)
    with torch.inference_mode():
        feats = lite0.module(x.contiguous(memory_format=torch.channels_last))
    assert feats.shape == (1, 1280)
    state = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    proba = F.linear(feats, state["_fc.weight"], state["_fc.bias"]).softmax(dim=1)[0]
    assert int(proba.argmax()) == PALACE
    assert float(proba[PALACE]) > 0.15


def test_lite0_features_depend_on_the_image(lite0):
    x = torch.stack([torch.zeros(3, 64, 64, dtype=torch.uint8), torch.full((3, 64, 64), 255, dtype=torch.uint8)])
    with torch.inference_mode():
        feats = lite0.module(_normalise(x, lite0))
    assert torch.isfinite(feats).all()
    assert not torch.allclose(feats[0], feats[1])


def _embed(enc, texts):
    batch = enc.tokenizer(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.inference_mode():
        return enc.pool(enc.model(**batch).last_hidden_state, batch["attention_mask"])


def test_minilm_embeddings_are_semantic_and_unit_norm(minilm):
    assert minilm.dim == 384 and minilm.normalize
    emb = _embed(minilm, [
        "A man is playing a guitar on stage.",
        "Someone performs music with a guitar.",
        "The central bank raised interest rates again.",
    ])
    assert emb.shape == (3, 384)
    np.testing.assert_allclose(emb.norm(dim=1).numpy(), 1.0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # paraphrase far closer than an unrelated sentence
    assert sim[0, 1] > sim[1, 2] + 0.3


def test_minilm_padding_does_not_change_an_embedding(minilm):
    alone = _embed(minilm, ["a red bus"])
    padded = _embed(minilm, ["a red bus", "a much longer sentence that forces padding onto the first one"])
    np.testing.assert_allclose(alone[0].numpy(), padded[0].numpy(), atol=1e-5)


def test_sentence_transformers_id_is_an_alias_of_the_packaged_minilm():
    assert canonical_name("sentence-transformers/all-MiniLM-L6-v2") == "all-MiniLM-L6-v2"
    assert canonical_name("resnet50") == "resnet50"


def test_unknown_image_encoder_lists_the_choices():
    with pytest.raises(UnknownEncoder) as info:
        load_image_encoder("resnet_9000", "cpu")
    msg = str(info.value)
    assert "resnet_9000" in msg and "efficientnet_lite0" in msg and "resnet50" in msg
    assert isinstance(info.value, EncoderUnavailable) and isinstance(info.value, ValueError)


@pytest.fixture
def empty_hub(tmp_path):
    hub = tmp_path / "hub"
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(hub))  # undone after the test
    yield hub
    torch.hub.set_dir(before)


def test_torchvision_model_without_cached_weights_names_the_file(empty_hub):
    import torchvision

    filename = torchvision.models.get_model_weights("resnet50").DEFAULT.url.rsplit("/", 1)[-1]
    with pytest.raises(EncoderUnavailable) as info:
        load_image_encoder("resnet50", "cpu")
    msg = str(info.value)
    assert filename in msg
    assert str(empty_hub / "checkpoints") in msg
    assert "get_model('resnet50', weights='DEFAULT')" in msg and "efficientnet_lite0" in msg
    assert not (empty_hub / "checkpoints" / filename).exists()  # and nothing was downloaded


def test_torchvision_model_loads_from_the_hub_cache(empty_hub):
    """A weight file already in the cache is used (here a random resnet18 saved under the official name)."""
    import torchvision

    weights = torchvision.models.get_model_weights("resnet18").DEFAULT
    (empty_hub / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), empty_hub / "checkpoints" / weights.url.rsplit("/", 1)[-1])
    enc = load_image_encoder("resnet18", "cpu")
    assert enc.dim == 512
    assert enc.mean == pytest.approx((0.485, 0.456, 0.406)) and enc.std == pytest.approx((0.229, 0.224, 0.225))
    with torch.inference_mode():
        out = enc.module(torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last))
    assert out.shape == (2, 512)  # pooled features: the ImageNet classifier is gone


def test_corrupt_torchvision_weight_file_is_reported(empty_hub):
    import torchvision

    filename = torchvision.models.get_model_weights("resnet18").DEFAULT.url.rsplit("/", 1)[-1]
    (empty_hub / "checkpoints").mkdir(parents=True)
    (empty_hub / "checkpoints" / filename).write_bytes(b"truncated download")
    with pytest.raises(EncoderUnavailable, match="could not load .*delete it"):
        load_image_encoder("resnet18", "cpu")


def test_unknown_hugging_face_id_is_unavailable_offline():
    with pytest.raises(EncoderUnavailable) as info:
        load_text_encoder("nobody-here/definitely-not-a-model", "cpu")
    msg = str(info.value)
    assert "nobody-here/definitely-not-a-model" in msg and "download" in msg and "HF_HUB_OFFLINE" in msg


def test_missing_local_text_folder_is_named(tmp_path):
    missing = tmp_path / "no" / "such" / "model"
    with pytest.raises(EncoderUnavailable, match="does not exist"):
        load_text_encoder(str(missing), "cpu")


def test_local_text_folder_loads(tmp_path, minilm):
    """Any Hugging Face model folder works; its modules.json decides L2 normalisation."""
    minilm.tokenizer.save_pretrained(tmp_path)
    minilm.model.save_pretrained(tmp_path)
    enc = load_text_encoder(str(tmp_path), "cpu")
    assert enc.dim == 384 and not enc.normalize  # no modules.json saved: plain mean pooling
    ours, theirs = _embed(enc, ["a red bus"]), _embed(minilm, ["a red bus"])
    np.testing.assert_allclose(F.normalize(ours, dim=1).numpy(), theirs.numpy(), atol=1e-5)
