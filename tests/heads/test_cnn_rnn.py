"""The cnn_rnn head (crossmodal.heads.cnn_rnn) on a small random word-embedding table: shapes, both fusions, absent
modalities, padding, and the saved head rebuilt on the encoder's table. Its training: tests/training/test_cnn_rnn.py."""

import numpy as np
import pytest
import torch
from torch import nn

from crossmodal.encoders.text import TextEncoder
from crossmodal.errors import TrainError
from crossmodal.heads.cnn_rnn import CnnRnnHead, load_cnn_rnn, predict_proba, tokenize
from crossmodal.heads.files import save_head

VOCAB, DIM, IMAGE_DIM, CLASSES = 50, 8, 12, 3


class _Words(nn.Module):
    """Just the part of a transformer the head reads: its input embeddings."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.embeddings = nn.Embedding.from_pretrained(table)

    def get_input_embeddings(self):
        return self.embeddings


def _encoder(seed: int = 0) -> TextEncoder:
    table = torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(seed))
    return TextEncoder(name="tiny-words", tokenizer=None, model=_Words(table), dim=DIM, normalize=False,
                       max_positions=64)


def _head(fusion="mlp", rnn="gru", seed=0) -> CnnRnnHead:
    torch.manual_seed(seed)
    head = CnnRnnHead.from_encoder(_encoder(), IMAGE_DIM, CLASSES, fusion=fusion, rnn=rnn, hidden=6, dropout=0.0,
                                   max_length=10)
    with torch.no_grad():  # non-zero fusion weights: a fused output that is neither branch alone
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return head.eval()


def _batch(n=5, length=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(n, IMAGE_DIM, generator=g)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    lengths = torch.tensor([length, 3, 1, 7, 5][:n])
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return image, ids * mask, mask


@pytest.mark.parametrize("fusion", ["weighted_sum", "mlp"])
@pytest.mark.parametrize("rnn", ["gru", "lstm"])
def test_shapes_and_absent_modalities(fusion, rnn):
    head = _head(fusion, rnn)
    image, ids, mask = _batch()
    with torch.no_grad():
        logits = head(image, ids, mask)
        li, lt, _, _ = head.branches(image, ids, mask)
        assert logits.shape == (5, CLASSES) and torch.isfinite(logits).all()
        assert not torch.allclose(logits, li) and not torch.allclose(logits, lt)
        no_image = torch.full_like(image, float("nan"))
        # Without an image the text branch decides alone, and the other way round; neither: still defined.
        torch.testing.assert_close(head(no_image, ids, mask), lt)
        torch.testing.assert_close(head(image, ids, torch.zeros_like(mask)), li)
        assert torch.isfinite(head(no_image, ids, torch.zeros_like(mask))).all()
        # An absent text's word ids are never read.
        other_ids = torch.randint(1, VOCAB, ids.shape)
        torch.testing.assert_close(head(image, other_ids, torch.zeros_like(mask)), li)


def test_padding_and_batch_neighbours_do_not_change_a_row():
    head = _head()
    image, ids, mask = _batch()
    with torch.no_grad():
        full = head(image, ids, mask)
        longer = head(image, torch.cat([ids, torch.zeros(5, 6, dtype=torch.long)], 1),
                      torch.cat([mask, torch.zeros(5, 6, dtype=torch.long)], 1))
        alone = torch.cat([head(image[k : k + 1], ids[k : k + 1], mask[k : k + 1]) for k in range(5)])
    torch.testing.assert_close(longer, full)
    torch.testing.assert_close(alone, full, atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # a word beyond a row's mask is padding, whatever its id
        changed = ids.clone()
        changed[1, 5] = 7
        torch.testing.assert_close(head(image, changed, mask), full)


def test_the_loss_trains_both_branches():
    head = _head("weighted_sum").train()
    image, ids, mask = _batch()
    y = torch.tensor([0, 1, 2, 0, 1])
    loss = head.loss(image, ids, mask, y, nn.CrossEntropyLoss())
    loss.backward()
    for part in (head.image_classifier, head.rnn, head.text_classifier):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert head.fusion_weight.grad.abs().sum() > 0
    assert "word_embeddings" not in head.state_dict()  # frozen and reloaded from the encoder, never saved


@pytest.mark.parametrize("fusion", ["weighted_sum", "mlp"])
def test_saved_head_gives_the_same_probabilities(tmp_path, fusion):
    head = _head(fusion)
    head.image_norm.fit(np.random.default_rng(0).normal(3.0, 2.0, (40, IMAGE_DIM)))
    image, ids, mask = _batch()
    image = image.numpy()
    image[2] = np.nan
    before = predict_proba(head, image, ids, mask)
    save_head(head, tmp_path / "cnn_rnn", {"family": "rnn"})
    loaded = load_cnn_rnn(tmp_path / "cnn_rnn", _encoder())
    np.testing.assert_array_equal(predict_proba(loaded, image, ids, mask), before)
    assert loaded.init_args == head.init_args and not loaded.training
    assert np.allclose(before.sum(1), 1.0, atol=1e-6)
    with pytest.raises(TrainError, match="word embeddings of text encoder 'tiny-words' differ"):
        load_cnn_rnn(tmp_path / "cnn_rnn", _encoder(seed=1))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="train.cnn_rnn.fusion"):
        CnnRnnHead.from_encoder(_encoder(), IMAGE_DIM, CLASSES, fusion="sum")
    with pytest.raises(ValueError, match="train.cnn_rnn.rnn"):
        CnnRnnHead.from_encoder(_encoder(), IMAGE_DIM, CLASSES, rnn="transformer")


def test_tokenize_reads_words_and_marks_absent_texts():
    from transformers import AutoTokenizer

    from crossmodal.encoders.text import minilm_folder

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    ids, mask = tokenize(tokenizer, ["a red bus", None, "   ", float("nan"), "word " * 40], max_length=8)
    assert ids.shape == mask.shape == (5, 8) and ids.dtype == torch.long
    assert mask.sum(1).tolist() == [3, 0, 0, 0, 8]  # no [CLS]/[SEP]; the long text is cut at max_length
    assert tokenizer.convert_ids_to_tokens(ids[0, :3].tolist()) == ["a", "red", "bus"]
