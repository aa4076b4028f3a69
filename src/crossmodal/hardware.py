"""Where and how fast the encoders run: device, precision, batch sizes, decoding workers and threads.

    from crossmodal.hardware import resolve_device, resolve_precision
    device = resolve_device("auto")                    # CUDA, else Apple MPS, else CPU
    dtype = resolve_precision("auto", device)          # bf16 where fast, fp16 on older GPUs, None (fp32) elsewhere

Used by the feature extractor (``crossmodal.features.extractor``), fine-tuning and serving.
"""

from __future__ import annotations

import functools
import os
from typing import TYPE_CHECKING

from crossmodal.errors import ConfigError

if TYPE_CHECKING:
    import torch


# --------------------------------------------------------------------------- device and precision
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` -> CUDA, else Apple MPS, else CPU. Asking for a device that is absent is a ConfigError."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"encoders.device {name!r} is not a device; use auto, cpu, cuda or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("encoders.device is 'cuda' but this torch sees no CUDA GPU; set encoders.device: auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("encoders.device is 'mps' but Apple MPS is not available; set encoders.device: auto or cpu")
    return device


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has bf16 matrix instructions (AMX or AVX512-BF16) that oneDNN uses."""
    import torch

    if not torch.backends.mkldnn.is_available():
        return False
    try:
        # torch tells the CPU's instruction sets only through these private helpers; the except below reads them
        # from /proc where they are gone.
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())  # noqa: SLF001
    except AttributeError:  # private helpers moved: read the flags ourselves (Linux)
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                flags = next((line.split(":", 1)[1].split() for line in fh if line.startswith("flags")), [])
        except OSError:
            return False
        return "amx_bf16" in flags or "avx512_bf16" in flags


def resolve_precision(precision: str, device: str | torch.device) -> torch.dtype | None:
    """The autocast dtype for ``precision`` on ``device``; None means plain fp32.

    ``auto`` picks bf16 where it is fast (CUDA with bf16 support, a CPU with AMX/AVX512-BF16),
    fp16 on older CUDA GPUs, and fp32 otherwise (bf16 emulated in software is slower than fp32).
    """
    import torch

    device = torch.device(device)
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision != "auto":
        raise ConfigError(f"encoders.precision {precision!r} is not one of auto, fp32, bf16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def precision_name(dtype: torch.dtype | None) -> str:
    """``None`` -> "fp32", ``torch.bfloat16`` -> "bf16", ``torch.float16`` -> "fp16" (as in cache keys)."""
    return "fp32" if dtype is None else {"torch.bfloat16": "bf16", "torch.float16": "fp16"}[str(dtype)]


# --------------------------------------------------------------------------- batch sizes and workers
# Image batches on a CPU are small on purpose: a batch of 8 keeps a block's activations in the CPU cache, which
# beats larger batches there (docs/features.md). With ``auto``, decoding still runs in loader batches of at least
# LOADER_BATCH images, so the workers hand over few, large batches.
AUTO_BATCH = {("image", "cpu"): 8, ("image", "gpu"): 256, ("text", "cpu"): 64, ("text", "gpu"): 512}
LOADER_BATCH = 32
# ``train.finetune``'s ``auto`` budget (``crossmodal.training.finetune.resolve_budget``): on a CPU, what keeps the
# demo's fine-tuning within its share of a few minutes on two cores (docs/heads.md); on a CUDA GPU, the image
# encoder's own 224 px, every training row and more epochs.
FINETUNE_BUDGET = {"cpu": {"epochs": 8, "max_train_rows": 2000, "image_size": 96},
                   "gpu": {"epochs": 15, "max_train_rows": None, "image_size": 224}}


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def auto_batch_size(kind: str, setting: int | str, device: torch.device) -> int:
    """The starting batch size: the configured int, or for ``auto`` a size by device kind (halved later on OOM)."""
    if setting != "auto":
        return int(setting)
    return AUTO_BATCH[(kind, "gpu" if device.type in ("cuda", "mps") else "cpu")]


def finetune_budget(device: torch.device) -> dict[str, int | None]:
    """What ``auto`` means for ``train.finetune.epochs``, ``max_train_rows`` and ``image_size`` on ``device``."""
    return dict(FINETUNE_BUDGET["gpu" if device.type == "cuda" else "cpu"])


def auto_num_workers(setting: int | str, device: torch.device, n_items: int, batch_size: int) -> int:
    """Decoding workers for ``n_items`` images. ``auto``: none for a batch or two (starting workers costs more
    than it saves, e.g. when serving one request); on a GPU machine one per core (the GPU waits on decoding);
    on a CPU half the cores, at least one, because the encoder needs the other half."""
    if setting != "auto":
        return int(setting)
    import multiprocessing

    # A daemonic process (a Dask worker's) may not start child processes: decode in this one.
    if n_items <= 2 * batch_size or multiprocessing.current_process().daemon:
        return 0
    cores = usable_cores()
    return max(1, cores if device.type == "cuda" else cores // 2)


def cpu_threads(setting: int | str, device: torch.device, n_items: int, batch_size: int) -> int:
    """Threads of the CPU pipeline (see FeatureExtractor._iter_threaded): one per core on a CPU device with
    ``num_workers: auto`` and more than two batches of images; 0 (the DataLoader path) otherwise."""
    if setting != "auto" or device.type != "cpu" or n_items <= 2 * batch_size:
        return 0
    cores = usable_cores()
    return max(1, cores)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``; a no-op context for ``dtype`` None (fp32)."""
    import torch

    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def is_oom(err: BaseException) -> bool:
    """True when ``err`` is the device running out of memory (CUDA, MPS or the CPU allocator)."""
    import torch

    oom = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom is not None and isinstance(err, oom)) or "out of memory" in str(err).lower()
