"""A separate process that runs the real ``publish`` stage, for the crash and concurrency tests.

Usage (from a test, through the ``publish_worker`` fixture of conftest.py, in the repository root)::

    python -m tests.registry.publish_worker --job job.json [--kill-at register|aliases] [--barrier DIR --parties 2]

``job.json`` holds the config (as a dict), the folders of one finished tiny pipeline run and optionally
``"force": true`` (register even an identical model, as ``crossmodal run --force``). ``--kill-at`` sends this
process SIGKILL at that point of registration (nothing can be cleaned up: the state a power cut leaves):
``register`` right after the new model version is created, ``aliases`` after the gate decided but before any alias
moved. ``--barrier`` makes every worker wait until all ``--parties`` reach the gate, so that their gates really start
at the same moment. The summary is written to ``<job>.out.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path


def _kill_after(fn):
    def wrapper(*args, **kwargs):
        out = fn(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGKILL)
        return out

    return wrapper


def _kill_before(fn):
    def wrapper(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)

    return wrapper


def _barrier(fn, folder: Path, parties: int):
    def wrapper(*args, **kwargs):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / str(os.getpid())).touch()
        deadline = time.time() + 300
        while len(list(folder.iterdir())) < parties:
            if time.time() > deadline:
                raise TimeoutError("the other workers never reached the barrier")
            time.sleep(0.05)
        return fn(*args, **kwargs)

    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--job", type=Path, required=True)
    ap.add_argument("--kill-at", choices=["register", "aliases"])
    ap.add_argument("--barrier", type=Path)
    ap.add_argument("--parties", type=int, default=2)
    args = ap.parse_args()
    job = json.loads(args.job.read_text())

    import mlflow
    from crossmodal.config import from_dict
    from crossmodal.registry import promotion
    from crossmodal.registry.publish import publish

    if args.kill_at == "register":
        mlflow.register_model = _kill_after(mlflow.register_model)
    elif args.kill_at == "aliases":
        promotion.set_aliases = _kill_before(promotion.set_aliases)
    if args.barrier:
        promotion.register_and_gate = _barrier(promotion.register_and_gate, args.barrier, args.parties)
    summary = publish(from_dict(job["cfg"]), job["manifest"], job["validated_dir"], job["models"], job["reports"],
                      run_name=job.get("run_name"), force=bool(job.get("force")))
    args.job.with_suffix(".out.json").write_text(json.dumps(summary, default=str))


if __name__ == "__main__":
    main()
