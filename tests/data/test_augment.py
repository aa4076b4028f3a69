"""Augmented views (crossmodal.data.augment): seeded per item and view, view 0 the item itself, each image operation
changing pixels, text operations at their rates and never emptying a text, and the settings' bounds."""

import numpy as np
import pytest
import torch
from PIL import Image

from crossmodal.config import AugmentConfig, ImageAugmentConfig, TextAugmentConfig, load_config
from crossmodal.data.augment import augment_pixels, augment_text, image_view, text_key, text_view, view_seed
from crossmodal.data.images import image_to_tensor
from crossmodal.errors import ConfigError

OFF = {"crop_scale": (1.0, 1.0), "flip": False, "color_jitter": 0.0}  # every image operation off
WORDS = " ".join(f"w{i}" for i in range(2000))


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    """A 60 x 40 image with structure in both directions and colour, so every operation shows."""
    y, x = np.mgrid[0:40, 0:60]
    rgb = np.stack([x * 4, y * 6, (x + y) * 2 % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def pixels(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


def test_a_view_is_the_same_for_the_same_item_and_view_and_differs_across_views(picture):
    cfg = ImageAugmentConfig()
    seeds = [view_seed("ab" * 32, v, seed=0) for v in (1, 2)]
    assert seeds[0] == view_seed("ab" * 32, 1, seed=0) and seeds[0] != seeds[1]
    assert view_seed("ab" * 32, 1, seed=1) != seeds[0] and view_seed("cd" * 32, 1, seed=0) != seeds[0]
    one = image_view(picture, 32, cfg, seeds[0], view=1)
    assert torch.equal(one, image_view(picture, 32, cfg, seeds[0], view=1))
    assert not torch.equal(one, image_view(picture, 32, cfg, seeds[1], view=2))
    text_cfg = TextAugmentConfig(token_dropout=0.3, deletion=0.3, swap=0.3)
    views = [text_view(WORDS[:200], text_cfg, view_seed(text_key(WORDS[:200]), v), v) for v in (1, 2)]
    assert views[0] == text_view(WORDS[:200], text_cfg, view_seed(text_key(WORDS[:200]), 1), 1)
    assert views[0] != views[1]


def test_augmenting_leaves_torchs_random_state_alone(picture):
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    image_view(picture, 32, ImageAugmentConfig(), 123, view=1)
    assert torch.equal(torch.rand(3), expected)


def test_view_0_is_the_item_itself(picture):
    cfg = AugmentConfig(views=3)
    assert torch.equal(image_view(picture, 32, cfg.image, 99, view=0), image_to_tensor(picture, 32))
    assert torch.equal(image_view(pixels(picture), 32, cfg.image, 99, view=0), image_to_tensor(picture, 32))
    assert text_view("a red bus", cfg.text, 99, view=0) == "a red bus"


def test_each_image_operation_changes_pixels_and_none_changes_nothing_but_the_resize(picture):
    x = pixels(picture)[:, :, 10:50]  # square: a crop of the whole area then fits the aspect-ratio range
    whole = augment_pixels(x, 40, ImageAugmentConfig(**OFF), seed=1)
    # With the crop covering the image, no flip and no jitter, a view is the plain resize of the whole image.
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    assert torch.equal(whole, F.resize(x, [40, 40], interpolation=InterpolationMode.BICUBIC, antialias=True))
    for change in ({"crop_scale": (0.3, 0.5)}, {"flip": True}, {"color_jitter": 0.5}):
        cfg = ImageAugmentConfig(**{**OFF, **change})
        changed = [not torch.equal(augment_pixels(x, 40, cfg, seed=s), whole) for s in range(8)]
        assert sum(changed) >= 3, change  # a flip happens with chance 1/2: most of 8 seeds show it
    flipped = next(augment_pixels(x, 40, ImageAugmentConfig(**{**OFF, "flip": True}), seed=s) for s in range(8)
                   if not torch.equal(augment_pixels(x, 40, ImageAugmentConfig(**{**OFF, "flip": True}), seed=s),
                                      whole))
    assert torch.equal(flipped, whole.flip(-1))
    out = augment_pixels(x, 24, ImageAugmentConfig(), seed=3)
    assert out.dtype == torch.uint8 and out.shape == (3, 24, 24)


def test_text_operations_happen_at_their_rates():
    words = WORDS.split()
    unk = text_view(WORDS, TextAugmentConfig(token_dropout=0.2, deletion=0, swap=0), 7, 1).split()
    assert len(unk) == len(words) and abs(unk.count("[UNK]") / len(words) - 0.2) < 0.04
    kept = text_view(WORDS, TextAugmentConfig(token_dropout=0, deletion=0.3, swap=0), 7, 1).split()
    assert abs(1 - len(kept) / len(words) - 0.3) < 0.04
    assert kept == [w for w in words if w in set(kept)]  # deletion keeps the order
    swapped = text_view(WORDS, TextAugmentConfig(token_dropout=0, deletion=0, swap=0.2), 7, 1).split()
    assert sorted(swapped) == sorted(words)
    moved = sum(a != b for a, b in zip(swapped, words))
    assert 0.2 < moved / len(words) < 0.4  # each swap moves two words; a swapped word is not swapped again
    assert text_view(WORDS, TextAugmentConfig(token_dropout=0.5, deletion=0, swap=0), 7, 1, unk="<unk>").count(
        "<unk>") > 0


def test_a_non_empty_text_never_becomes_empty_or_unknown_tokens_only():
    harsh = TextAugmentConfig(token_dropout=0.99, deletion=0.99, swap=1.0)
    for seed in range(200):
        for text in ("cat", "red bus", "a small red bus"):
            out = augment_text(text, harsh, seed)
            assert out and any(w != "[UNK]" for w in out.split()) and set(out.split()) <= set(text.split()) | {"[UNK]"}
    assert augment_text("", harsh, 1) == ""


@pytest.mark.parametrize("bad", [{"image": {"crop_scale": [0.9, 0.5]}}, {"image": {"crop_scale": [0, 1]}},
                                 {"image": {"crop_scale": [0.5, 1.2]}}, {"image": {"color_jitter": 1.5}},
                                 {"text": {"deletion": 1.0}}, {"text": {"token_dropout": -0.1}},
                                 {"text": {"swap": 2}}, {"views": -1}, {"views": 100}, {"image": {"blur": 1}}])
def test_bad_settings_are_config_errors_naming_the_setting(tmp_path, bad):
    params = tmp_path / "params.yaml"
    import yaml

    params.write_text(yaml.safe_dump({"train": {"augment": bad}}))
    with pytest.raises(ConfigError, match="train.augment"):
        load_config(params)


def test_views_are_on_only_with_a_count_and_a_consumer():
    assert not AugmentConfig().for_finetune and not AugmentConfig().for_frozen
    assert AugmentConfig(views=2).for_finetune and not AugmentConfig(views=2).for_frozen
    assert AugmentConfig(views=2, frozen=True, finetune=False).for_frozen
    assert not AugmentConfig(views=2, finetune=False).for_finetune
