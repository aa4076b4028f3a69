"""The frozen-feature heads on augmented views (train.augment.frozen): the loop sees each training row as one of its
views per epoch, views that are copies of the rows change nothing, and with the switch off the views are ignored."""

import numpy as np
import pytest
import torch

from crossmodal.config import TrainConfig
from crossmodal.errors import TrainError
from crossmodal.heads import registry
from crossmodal.training.dataset import load_split_features
from crossmodal.training.loop import frozen_views, train_head

K = 2


@pytest.fixture
def inputs(tmp_path, write_inputs):
    (validated, image, text), df = write_inputs(tmp_path, n=90)
    return validated, image, text


def with_views(inputs, tmp_path, make):
    """The features of ``inputs`` with views ``make(rows, k)`` (float32 like the rows) saved and loaded."""
    data, _ = load_split_features(*inputs)
    paths = {}
    for kind in ("image", "text"):
        rows = getattr(data, kind)["train"]
        paths[f"{kind}_path"] = tmp_path / f"{kind}-views.npy"
        np.save(paths[f"{kind}_path"], np.stack([make(rows, k) for k in range(1, K + 1)]).astype(np.float32))
    return load_split_features(*inputs, views=paths)[0]


def cfg(**augment) -> TrainConfig:
    return TrainConfig(max_epochs=4, patience=10, hidden_dim=16, augment={"views": K, **augment})


def trained(name, data, config):
    head, history = train_head(name, data, config, 3)
    return {k: v.clone() for k, v in head.state_dict().items()}, history


def same(a, b) -> bool:
    return a[1] == b[1] and all(torch.equal(a[0][k], b[0][k]) for k in a[0])


def test_views_that_copy_the_rows_change_nothing(inputs, tmp_path):
    plain, _ = load_split_features(*inputs)
    copies = with_views(inputs, tmp_path, lambda rows, k: rows)
    # The view draws come from a stream of their own: batch order and the head's initialisation stay as they were.
    assert same(trained("concat", plain, cfg(frozen=True)), trained("concat", copies, cfg(frozen=True)))


def test_views_are_used_only_with_the_switch_on(inputs, tmp_path):
    plain, _ = load_split_features(*inputs)
    rng = np.random.default_rng(0)
    noisy = with_views(inputs, tmp_path, lambda rows, k: rows + rng.normal(0, 1.0, rows.shape))
    off = trained("gated", plain, cfg())
    assert same(off, trained("gated", noisy, cfg()))  # frozen: false
    assert same(off, trained("gated", noisy, TrainConfig(max_epochs=4, patience=10, hidden_dim=16)))  # views: 0
    assert not same(off, trained("gated", noisy, cfg(frozen=True)))


def test_each_epoch_sees_every_row_once_as_one_of_its_views(inputs, tmp_path, monkeypatch):
    marked = with_views(inputs, tmp_path, lambda rows, k: rows + 1000.0 * k)  # view k: its number in the thousands
    seen = []
    build = registry.build_head

    def recording(*args, **kwargs):
        head = build(*args, **kwargs)
        head.register_forward_pre_hook(lambda mod, inp: seen.append(inp[0][:, 0].clone()) if mod.training else None)
        return head

    monkeypatch.setattr(registry, "build_head", recording)
    config = TrainConfig(max_epochs=3, patience=10, hidden_dim=16, batch_size=1000,  # one batch per epoch
                         augment={"views": K, "frozen": True})
    train_head("concat", marked, config, 3)
    n = len(marked.y["train"])
    assert len(seen) == 3 and all(len(s) == n for s in seen)
    views = torch.cat(seen) / 1000
    assert set(views.round().int().tolist()) == {0, 1, 2}  # every view is drawn, view 0 (the row) too
    assert not torch.equal(seen[0], seen[1])  # drawn anew each epoch


def test_stacked_views_and_their_checks(inputs, tmp_path):
    data = with_views(inputs, tmp_path, lambda rows, k: rows + k)
    image, text, generator = frozen_views(data, cfg(frozen=True))
    assert image.shape == (K + 1, *data.image["train"].shape) and text.shape[0] == K + 1
    np.testing.assert_array_equal(image[0].numpy(), data.image["train"])
    np.testing.assert_array_equal(image[2].numpy(), data.image["train"] + 2)
    assert isinstance(generator, torch.Generator)
    assert frozen_views(data, cfg()) is None and frozen_views(load_split_features(*inputs)[0], cfg(frozen=True)) is None
    with pytest.raises(TrainError, match="train.augment.views is 3"):
        frozen_views(data, cfg(frozen=True, views=3))
    bad = {"image_path": tmp_path / "image-views.npy", "text_path": tmp_path / "short.npy"}
    np.save(bad["text_path"], np.zeros((K, 3, 6), dtype=np.float32))
    with pytest.raises(TrainError, match="stale"):
        load_split_features(*inputs, views=bad)
