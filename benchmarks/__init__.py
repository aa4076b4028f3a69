"""Throughput and memory benchmarks, each printed as ratios against a baseline measured in the same run.

Run from the repository root with the project's virtual environment::

    .venv/bin/python -m benchmarks.extract [--quick] [--device cuda]   # or: .venv/bin/python benchmarks/extract.py
    .venv/bin/python -m benchmarks.train [--quick]
    .venv/bin/python -m benchmarks.predict [--quick]
    .venv/bin/python -m benchmarks.flow [--quick]
    .venv/bin/python benchmarks/validate.py [--rows N --images M]
    .venv/bin/python benchmarks/serve_load.py [--clients N --requests M]

Each prints its figures and ends with one JSON object on its last line; those built on :func:`parser` also print
their targets with PASS/FAIL. ``--quick`` uses CI-friendly sizes. Targets are printed, never asserted: a benchmark
is a measurement, and timings on a shared machine are noisy.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from contextlib import contextmanager

# Same offline, quiet environment as the CLI (no telemetry lookups, no hub downloads).
for _k, _v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1",
               "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)


def parser(doc: str, quick: str = "CI-friendly sizes", device: bool = False):
    """The benchmarks' command line: a description from the module docstring, ``--quick``, and ``--device``."""
    import argparse

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=quick)
    if device:
        ap.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    return ap


def say(*parts) -> None:
    print(*parts, flush=True)


@contextmanager
def timer(out: dict, key: str):
    t0 = time.perf_counter()
    yield
    out[key] = time.perf_counter() - t0


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def check(name: str, value: float, op: str, target: float, unit: str = "") -> bool:
    ok = value >= target if op == ">=" else value <= target
    say(f"  target {name}: {value:.3g}{unit} {op} {target:g}{unit}  {'PASS' if ok else 'FAIL'}")
    return ok


def machine() -> str:
    import platform

    import torch

    from crossmodal.hardware import usable_cores

    cores = usable_cores()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{platform.machine()}, {cores} CPU cores, {gpu}, torch {torch.__version__}"


def emit(result: dict) -> None:
    """The last line: one JSON object (machine-readable; everything above it is for people)."""
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()}), flush=True)
