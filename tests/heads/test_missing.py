"""Missing modalities in the heads: absent rows are filled with a learnt placeholder and ignored by the
standardisers, every head predicts with either modality absent, and late fusion then uses the present one alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crossmodal.heads.common import Standardize, fill_missing
from crossmodal.heads.inference import predict_proba, without
from crossmodal.heads.registry import HEADS, build_head, fit_standardizers


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


def test_late_fusion_uses_the_present_modality_alone():
    head = build_head("late", 3, 2, 2, hidden_dim=8).eval()
    head.image_weight.fill_(0.0)  # on complete rows only the text counts
    image, text = torch.randn(4, 3), torch.randn(4, 2)
    no_text = torch.full_like(text, float("nan"))
    with torch.no_grad():
        p = torch.softmax(head(image, no_text), 1)
        alone = torch.softmax(head.image_classifier(head.image_norm(image)), 1)
    torch.testing.assert_close(p, alone)
