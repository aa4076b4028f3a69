"""Mini-batch indices for training (crossmodal.training.loop.BatchStream): plain shuffled passes on small data,
fixed-size epochs with larger batches on large data."""

from __future__ import annotations

import torch

from crossmodal.training.loop import BatchStream


def test_small_training_sets_get_one_shuffled_pass_per_epoch():
    stream = BatchStream(1000, 64, torch.Generator().manual_seed(3), epoch_rows=8192)
    reference = torch.Generator().manual_seed(3)
    for _ in range(3):  # the very batches a plain randperm(n).split(batch_size) per epoch gives
        expected = torch.randperm(1000, generator=reference).split(64)
        got = stream.epoch()
        assert len(got) == len(expected) and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))


def test_large_training_sets_get_fixed_size_epochs_and_every_row_once_per_pass():
    n, epoch_rows = 10_000, 1024
    stream = BatchStream(n, 64, torch.Generator().manual_seed(0), epoch_rows=epoch_rows)
    assert stream.batch_size == 64 * 8  # 10000 // 1024 = 9 -> 8 (a power of two, at most 8x)
    seen = []
    for _ in range(30):  # 30 epochs of 1024 rows: three whole passes and a bit
        batches = stream.epoch()
        assert sum(len(b) for b in batches) == epoch_rows
        assert max(len(b) for b in batches) == stream.batch_size
        seen.append(torch.cat(batches))
    rows = torch.cat(seen)
    for p in range(3):  # each pass is a permutation of all rows
        assert torch.equal(rows[p * n : (p + 1) * n].sort().values, torch.arange(n))
    assert BatchStream(3 * 1024 + 1, 64, torch.Generator(), epoch_rows=1024).batch_size == 128
    assert BatchStream(1024, 64, torch.Generator(), epoch_rows=1024).batch_size == 64
