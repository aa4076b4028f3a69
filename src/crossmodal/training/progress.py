"""Live training progress: one JSON line per epoch and task, appended to a file while the task trains.

Training tasks may run in other processes (or, on a cluster, other machines sharing the run folder), so progress
travels through files rather than callbacks: each task appends to ``<progress_dir>/<task>.jsonl`` and whoever
watches (the MLflow tracker, a terminal display) tails the folder. A line is written whole and flushed at once,
so a reader sees complete lines or nothing new; a torn last line (a killed writer) is held back until it ends.

Usage::

    from crossmodal.training.progress import ProgressTail, epoch_writer
    log = epoch_writer("work/runs/R/progress", "concat")      # None when progress_dir is None
    log({"epoch": 1, "train_loss": 0.9, "val_loss": 0.8, "val_macro_f1": 0.61})
    tail = ProgressTail("work/runs/R/progress")
    tail.poll()          # [("concat", {"epoch": 1, ..., "time": 1764627000.1})], then only new lines

The pipeline's own events (a stage started or finished, how many items extraction has encoded) travel the same
way, one folder down, so that a tail of the heads' folder never takes them for a head::

    stage = event_writer("work/runs/R/progress", STAGE_EVENTS)
    stage({"stage": "validate", "state": "started"})
    ProgressTail(events_dir("work/runs/R/progress")).poll()    # [("stages", {"stage": "validate", ...})]
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

from crossmodal.artifacts import EVENTS_DIR

SUFFIX = ".jsonl"


def epoch_writer(progress_dir: str | Path | None, task: str) -> Callable[[dict], None] | None:
    """A function that appends one epoch's record for ``task``; None without a folder (nobody watches)."""
    if progress_dir is None:
        return None
    path = Path(progress_dir) / f"{task}{SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(record: dict) -> None:
        clean = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in record.items()}
        line = json.dumps({**clean, "time": time.time()}, default=str) + "\n"
        # O_APPEND: one write per line, so lines of a retried task never interleave inside a line.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode("utf-8"))
        finally:
            os.close(fd)

    return write


def events_dir(progress_dir: str | Path) -> Path:
    """The folder of the pipeline's own event streams under ``progress_dir``."""
    return Path(progress_dir) / EVENTS_DIR


def event_writer(progress_dir: str | Path | None, stream: str) -> Callable[[dict], None] | None:
    """A function that appends one event to ``<progress_dir>/pipeline/<stream>.jsonl``; None without a folder."""
    return None if progress_dir is None else epoch_writer(events_dir(progress_dir), stream)


class ProgressTail:
    """Reads what the tasks under a progress folder appended since the last :meth:`poll`."""

    def __init__(self, progress_dir: str | Path):
        self.folder = Path(progress_dir)
        self._offsets: dict[Path, int] = {}

    def poll(self) -> list[tuple[str, dict]]:
        """New complete lines as (task, record), per file in the order written; unreadable lines are skipped."""
        out: list[tuple[str, dict]] = []
        if not self.folder.is_dir():
            return out
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            start = self._offsets.get(path, 0)
            try:
                with open(path, "rb") as fh:
                    fh.seek(start)
                    chunk = fh.read()
            except OSError:
                continue
            end = chunk.rfind(b"\n") + 1  # only whole lines; the rest waits for its newline
            self._offsets[path] = start + end
            for raw in chunk[:end].splitlines():
                try:
                    out.append((path.name[: -len(SUFFIX)], json.loads(raw)))
                except ValueError:
                    continue
        return out
