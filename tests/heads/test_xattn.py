"""The cross-attention head of the fine-tuned model (crossmodal.heads.xattn): it reads the image's spatial grid,
and torchvision CNNs give one. The fine-tuning itself is tested in tests/training/test_finetune.py."""

import pytest
import torch

from crossmodal.errors import FinetuneError
from crossmodal.heads import xattn


def test_cross_attention_reads_the_spatial_grid():
    torch.manual_seed(0)
    head = xattn.CrossAttentionHead(image_channels=8, text_dim=6, num_classes=3, model_dim=16, heads=2).eval()
    grid = torch.randn(1, 8, 3, 3)
    tokens, mask = torch.randn(1, 5, 6), torch.ones(1, 5, dtype=torch.long)
    present, absent = torch.tensor([False]), torch.tensor([True])
    base = head(grid, tokens, mask, present, present)
    one_cell = grid.clone()
    one_cell[0, :, 1, 2] += 3.0
    assert not torch.allclose(head(one_cell, tokens, mask, present, present), base)
    swapped = grid.clone()  # same cells, two of them swapped: the pooled (mean) vector is unchanged
    swapped[0, :, 0, 0], swapped[0, :, 2, 2] = grid[0, :, 2, 2], grid[0, :, 0, 0]
    assert torch.allclose(swapped.mean((2, 3)), grid.mean((2, 3)))
    assert not torch.allclose(head(swapped, tokens, mask, present, present), base, atol=1e-6)
    # With the image absent, the grid is replaced by the placeholder: the grid no longer matters, the text does.
    assert torch.allclose(head(one_cell, tokens, mask, absent, present), head(grid, tokens, mask, absent, present))
    assert not torch.allclose(head(grid, tokens + 1, mask, absent, present), head(grid, tokens, mask, absent, present))
    # Padding tokens are ignored.
    padded = torch.cat([tokens, torch.randn(1, 3, 6)], 1)
    pmask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.long)], 1)
    assert torch.allclose(head(grid, padded, pmask, present, present), base, atol=1e-5)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_cnns_give_a_spatial_grid(name):
    """The generic path for torchvision CNNs (random weights here: nothing is downloaded)."""
    import torchvision

    net = torchvision.models.get_model(name, weights=None).eval()
    units = xattn.image_units(net, name)
    x = torch.randn(1, 3, 64, 64)
    grid = x
    with torch.no_grad():
        for unit in units:
            grid = unit(grid)
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid, 1).flatten(1)
        reference = torch.nn.Sequential(*list(net.children())[:-1])(x).flatten(1) if name == "resnet18" else \
            net.avgpool(net.features(x)).flatten(1)
    assert grid.ndim == 4 and grid.shape[2] >= 2
    torch.testing.assert_close(pooled, reference)
    with pytest.raises(FinetuneError, match="spatial feature map"):
        xattn.image_units(torch.nn.Linear(3, 3), "linear")
