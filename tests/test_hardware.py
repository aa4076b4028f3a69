"""Hardware: devices and precisions as configured, and the automatic batch sizes and worker counts."""

from __future__ import annotations

import pytest
import torch

from crossmodal import hardware
from crossmodal.errors import ConfigError
from crossmodal.hardware import resolve_device, resolve_precision


def test_device_and_precision_resolution(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(ConfigError, match="no CUDA"):
            resolve_device("cuda")
    cpu = torch.device("cpu")
    assert resolve_precision("fp32", cpu) is None
    assert resolve_precision("bf16", cpu) is torch.bfloat16
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", cpu) is None  # fp32 fallback where bf16 would be emulated
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", cpu) is torch.bfloat16


def test_auto_batch_sizes_and_workers(monkeypatch):
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert hardware.auto_batch_size("image", "auto", cpu) == 8 and hardware.auto_batch_size("image", "auto", gpu) == 256
    assert hardware.auto_batch_size("text", "auto", cpu) == 64 and hardware.auto_batch_size("text", 7, gpu) == 7
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert hardware.auto_num_workers("auto", cpu, 1, 32) == 0  # one request: starting workers costs more than it saves
    assert hardware.auto_num_workers("auto", cpu, 1000, 32) == 8  # half the cores: the encoder needs the rest
    assert hardware.auto_num_workers("auto", gpu, 1000, 32) == 16
    assert hardware.auto_num_workers(3, cpu, 1, 32) == 3
    monkeypatch.setattr(hardware.os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert hardware.auto_num_workers("auto", cpu, 1000, 32) == 1
    with pytest.raises(ConfigError, match="encoders.image.batch_size"):
        from crossmodal.config import from_dict

        from_dict({"encoders": {"image": {"batch_size": 0}}})
