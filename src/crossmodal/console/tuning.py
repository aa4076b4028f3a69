"""What ``crossmodal tune`` shows: a line per stage and per finished trial while it searches, then the table of
each head's validation macro-F1 with its settings before the search and after.

    from crossmodal.console.tuning import TrialLines, tune_rows
    with TrialLines(progress_dir, term):      # tails <progress_dir>/pipeline/*.jsonl (flows.tuning writes them)
        result = run_tune(..., progress_dir=str(progress_dir))
    header, rows = tune_rows(result)          # head, trials (pruned), before, tuned, change, best trial
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from crossmodal.artifacts import STAGE_EVENTS, TUNE_EVENTS
from crossmodal.console.terminal import Terminal
from crossmodal.training.progress import ProgressTail, events_dir

POLL_SECONDS = 0.5
STAGE_TITLES = {"validate": "validating the manifest", "extract": "extracting features (the store's are reused)",
                "tune": "searching"}


def trial_line(record: dict[str, Any]) -> str:
    """``concat #3  val macro-F1 0.9412  (12.3 s)``, or the epoch it was pruned at, or why it failed."""
    head = f"{record.get('head')} #{record.get('number')}"
    if record.get("failed"):
        what = f"failed: {record['failed']}"
    elif record.get("pruned"):
        what = f"pruned at epoch {record.get('pruned_at')}"
    else:
        what = f"val macro-F1 {record.get('value', float('nan')):.4f}"
    seconds = record.get("seconds")
    return f"  {head:<16} {what}" + (f"  ({seconds:.1f} s)" if isinstance(seconds, int | float) else "")


class TrialLines:
    """Prints what the tune flow appends under ``progress_dir`` (stages starting, trials ending) while it runs."""

    def __init__(self, progress_dir: str | Path, terminal: Terminal):
        self.tail = ProgressTail(events_dir(progress_dir))
        self.terminal = terminal
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll(self) -> list[str]:
        lines = []
        for stream, record in self.tail.poll():
            if stream == TUNE_EVENTS:
                lines.append(trial_line(record))
            elif stream == STAGE_EVENTS and record.get("state") == "started" and record.get("stage") in STAGE_TITLES:
                lines.append(f"{STAGE_TITLES[record['stage']]} ...")
        return lines

    def _say(self) -> None:
        for line in self.poll():
            self.terminal.line(line)

    def _watch(self) -> None:
        while not self._stop.wait(POLL_SECONDS):
            self._say()

    def __enter__(self) -> TrialLines:
        self._thread = threading.Thread(target=self._watch, name="crossmodal-tune-lines", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._say()


def tune_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The closing table of a search (``flows.tuning.tune_flow``'s result): one row per head."""
    def f1(v):
        return "-" if v is None else f"{v:.4f}"

    rows = []
    for head, h in result["heads"].items():
        change = "-" if h["default"] is None or h["best"] is None else f"{h['best'] - h['default']:+.4f}"
        trials = f"{h['trials']}" + (f" ({h['pruned']} pruned)" if h["pruned"] else "") + \
            (f" ({h['failed']} failed)" if h["failed"] else "")
        rows.append([head, trials, f1(h["default"]), f1(h["best"]), change,
                     "-" if h["best_trial"] is None else str(h["best_trial"])])
    return ["head", "trials", "val macro-F1 before", "tuned", "change", "best trial"], rows
