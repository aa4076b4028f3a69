"""The live progress of a pipeline run, read from its progress folder while the flow runs: each stage (validate,
extract, train, evaluate, publish) with its state and seconds, extraction's images and texts done of their total,
each head's epoch and validation macro-F1 (fine-tuning's too).

    from crossmodal.console.display import RunDisplay, head_plan
    from crossmodal.console.terminal import Terminal
    with RunDisplay("work/progress/R", Terminal(), head_plan(cfg)):
        run_training("params.yaml", progress_dir="work/progress/R")

The flow writes JSON lines (``crossmodal.training.progress``): the heads their epochs (``<head>.jsonl``), the flow
its stages and extraction its counts (``pipeline/stages.jsonl``, ``pipeline/extract.jsonl``). A thread reads what
was appended every ``POLL_SECONDS``; on a terminal a Rich ``Live`` view redraws the whole picture, otherwise (piped,
``--plain`` or ``--verbose``) each stage prints one line when it starts and when it ends, and the heads one line
each when training ends, so a log file tells the same story without redrawing. Files, not callbacks, because the
stages may run in other processes or on other machines that share the folder.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress_bar import ProgressBar
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from crossmodal.artifacts import EXTRACT_EVENTS, STAGE_EVENTS
from crossmodal.config import FINETUNED_HEADS, RNN_HEADS, TRADITIONAL_HEADS, Config
from crossmodal.console.terminal import Terminal
from crossmodal.errors import ConfigError
from crossmodal.hardware import finetune_budget, resolve_device
from crossmodal.training.progress import ProgressTail, events_dir

STAGES = ("validate", "extract", "train", "evaluate", "publish")
# Before the first stage: the Prefect API (a temporary one takes seconds to start) and the MLflow run open.
START = "start"
TITLES = {START: "start flow", "validate": "validate", "extract": "extract features", "train": "train heads",
          "evaluate": "evaluate", "publish": "publish"}
KIND_TITLES = {"image": "images", "text": "texts"}
POLL_SECONDS = 0.25
BAR_WIDTH = 20


def head_plan(cfg: Config) -> dict[str, int | None]:
    """The heads a run trains, each with the most epochs it may run (None: a baseline fitted without epochs)."""
    train, plan = cfg.train, {}
    for name in train.heads:
        if name in FINETUNED_HEADS:
            if train.finetune.enabled:
                plan[name] = _finetune_epochs(cfg)
        elif name in RNN_HEADS:
            plan[name] = train.cnn_rnn.epochs
        else:
            plan[name] = None if name in TRADITIONAL_HEADS else train.max_epochs
    return plan


def _finetune_epochs(cfg: Config) -> int:
    """``train.finetune.epochs``, its ``auto`` resolved for the device the run fine-tunes on."""
    epochs = cfg.train.finetune.epochs
    if epochs != "auto":
        return epochs
    try:
        device = resolve_device(cfg.encoders.device)
    except ConfigError:  # the run itself says so; the display only needs a number to draw
        device = resolve_device("cpu")
    return finetune_budget(device)["epochs"]


@dataclass
class _Stage:
    state: str = "pending"  # running | finished | cached | failed
    started: float | None = None
    seconds: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Head:
    epochs: int | None  # the most it may run; early stopping may end it sooner
    epoch: int = 0
    val_f1: float | None = None
    best_f1: float | None = None
    best_epoch: int | None = None
    started: float | None = None


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f} s" if value < 60 else f"{int(value // 60)}m{int(value % 60):02d}s"


def _f1(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


class RunDisplay:
    """A context manager showing the run whose progress files appear under ``progress_dir``; see the module
    docstring. ``heads``: :func:`head_plan` (heads not in it are shown too, once they write)."""

    def __init__(self, progress_dir: str | Path, terminal: Terminal, heads: Mapping[str, int | None] | None = None,
                 poll_seconds: float = POLL_SECONDS):
        self.terminal = terminal
        self.stages = {name: _Stage() for name in (START, *STAGES)}
        self.extraction: dict[str, tuple[int, int]] = {}
        self.shards: dict[str, dict] = {}  # kind -> {shard: (done, total)} while shards encode
        self.heads = {name: _Head(epochs) for name, epochs in (heads or {}).items()}
        self._heads_tail = ProgressTail(progress_dir)
        self._events_tail = ProgressTail(events_dir(progress_dir))
        self._poll_seconds = poll_seconds
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._live = None

    # ------------------------------------------------------------------ reading
    def poll(self) -> list[str]:
        """Apply what was appended since the last call; returns the plain lines it tells."""
        lines: list[str] = []
        with self._lock:
            # Epochs first: a head's last epoch is written before the train stage says it finished.
            for head, record in self._heads_tail.poll():
                self.apply_epoch(head, record)
            for stream, record in self._events_tail.poll():
                lines += self.apply_event(stream, record)
        return lines

    def apply_event(self, stream: str, record: dict[str, Any]) -> list[str]:
        """One line of ``pipeline/<stream>.jsonl``; returns the plain lines it tells."""
        if stream == EXTRACT_EVENTS:
            if "kind" in record:
                kind, counts = str(record["kind"]), (int(record.get("done") or 0), int(record.get("total") or 0))
                if "shard" in record:  # shards encode at once: the kind's count is their sum
                    self.shards.setdefault(kind, {})[record["shard"]] = counts
                    parts = self.shards[kind].values()
                    counts = (sum(d for d, _ in parts), sum(t for _, t in parts))
                else:  # the whole kind (assembled from the store): replaces its shards' counts
                    self.shards.pop(kind, None)
                self.extraction[kind] = counts
            return []
        if stream != STAGE_EVENTS or "stage" not in record:
            return []
        name, state = str(record["stage"]), str(record.get("state"))
        lines: list[str] = []
        start = self.stages[START]
        if start.state == "running":  # the flow is up: its first stage has news
            start.state = "finished"
            start.seconds = max(record.get("time", time.time()) - (start.started or time.time()), 0.0)
            lines.append(f"{TITLES[START]}: done in {_seconds(start.seconds)}")
        stage = self.stages.setdefault(name, _Stage())
        title = TITLES.get(name, name)
        if state == "started":
            stage.state, stage.started = "running", record.get("time", time.time())
            return [*lines, f"{title} ..."]
        stage.state, stage.seconds = state, record.get("seconds")
        stage.info = {k: v for k, v in record.items() if k not in ("stage", "state", "seconds", "time")}
        if state == "failed":
            return [*lines, f"{title}: failed after {_seconds(stage.seconds)}"]
        how = "cached" if state == "cached" else "done"
        detail = self._stage_detail(name, stage)
        lines.append(f"{title}: {how} in {_seconds(stage.seconds)}" + (f" ({detail})" if detail else ""))
        if name == "train" and state == "finished":
            lines += [f"  {head}: {self._head_summary(h)}" for head, h in self.heads.items()]
        return lines

    def apply_epoch(self, head: str, record: dict[str, Any]) -> None:
        """One epoch line of ``<head>.jsonl``."""
        h = self.heads.setdefault(head, _Head(None))
        h.epoch = int(record.get("epoch") or h.epoch + 1)
        if h.started is None:
            h.started = record.get("time", time.time())
        f1 = record.get("val_macro_f1")
        h.val_f1 = f1 if isinstance(f1, int | float) else None
        if h.val_f1 is not None and (h.best_f1 is None or h.val_f1 > h.best_f1):
            h.best_f1, h.best_epoch = h.val_f1, h.epoch

    # ------------------------------------------------------------------ words
    def _stage_detail(self, name: str, stage: _Stage) -> str:
        info = stage.info
        if name == START:
            return "Prefect API, MLflow run" if stage.state == "running" else ""
        if name == "validate" and "rows_in" in info:
            return (f"{info['rows_in']} rows in = {info['rows_kept']} kept + {info['rows_quarantined']} "
                    "quarantined")
        if name == "extract" and isinstance(info.get("encoded"), dict):
            parts = [(what, counts) for what, counts in (("encoded", info["encoded"]),
                                                         ("from the store", info.get("reused") or {}))
                     if any(counts.values())]
            lines = [f"{what} " + ", ".join(f"{n} {KIND_TITLES.get(k, k)}" for k, n in counts.items())
                     for what, counts in parts]
            views = info.get("views")
            if views:  # train.augment: the frozen heads' views, encoded into the same store
                lines.append(f"{views['views']} augmented view{'s' if views['views'] != 1 else ''} of "
                             f"{views['rows']} training rows, "
                             f"{views['encoded']} encoded")
            return "; ".join(lines)
        if name == "publish" and info.get("version"):
            return (f"unchanged since version {info['version']}" if stage.state == "cached"
                    else f"version {info['version']}")
        return ""

    @staticmethod
    def _head_summary(h: _Head) -> str:
        if not h.epoch:
            return "done"
        best = f", best val macro-F1 {_f1(h.best_f1)} (epoch {h.best_epoch})" if h.best_epoch else ""
        return f"{h.epoch} epoch{'s' if h.epoch != 1 else ''}{best}"

    # ------------------------------------------------------------------ picture
    def __rich_console__(self, console, options):
        with self._lock:
            yield self._table(time.time(), options.max_width)

    def _icon(self, state: str):
        return {"running": Spinner("dots", style="cyan"), "finished": Text("✓", style="green"),
                "cached": Text("✓", style="cyan"), "failed": Text("✗", style="bold red")}.get(
                    state, Text("·", style="dim"))

    def _label(self, head: str) -> str:
        return f"  {head}" + (" (fine-tuning)" if head in FINETUNED_HEADS else "")

    def _table(self, now: float, width: int = 100) -> Table:
        # Fixed widths but for the details, which give way (cut with an ellipsis) on a narrow terminal.
        names = [TITLES.get(n, n) for n in self.stages] + [self._label(h) for h in self.heads]
        name_width, time_width = max(map(len, names)), len("999m59s")
        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=1, no_wrap=True)
        grid.add_column(width=name_width, no_wrap=True)
        grid.add_column(width=BAR_WIDTH, no_wrap=True)
        grid.add_column(no_wrap=True, overflow="ellipsis",
                        max_width=max(width - (1 + name_width + BAR_WIDTH + time_width + 4), 8))
        grid.add_column(width=time_width, justify="right", no_wrap=True)
        for name, stage in self.stages.items():
            if name == START and stage.state == "pending":  # shown from the moment the display starts
                continue
            running = stage.state == "running"
            elapsed = (now - stage.started) if running and stage.started else stage.seconds
            title = Text(TITLES.get(name, name), style="bold" if running else ("dim" if stage.state == "pending"
                                                                               else ""))
            bar: Any = ""
            if running and name not in ("extract", "train"):
                bar = ProgressBar(total=None, width=BAR_WIDTH, pulse=True)
            detail = Text(self._stage_detail(name, stage) if not running or name == START else "", style="dim")
            if stage.state == "cached":
                detail = Text(" ".join(filter(None, ["cached", detail.plain])), style="cyan")
            grid.add_row(self._icon(stage.state), title, bar, detail, Text(_seconds(elapsed), style="dim"))
            if name == "extract" and stage.state != "cached":
                for kind, (done, total) in self.extraction.items():
                    state = "finished" if total and done >= total else ("running" if running else stage.state)
                    grid.add_row(self._icon(state), Text(f"  {KIND_TITLES.get(kind, kind)}"),
                                 ProgressBar(total=max(total, 1), completed=done, width=BAR_WIDTH),
                                 Text(f"{done}/{total}"), "")
            if name == "train" and stage.state in ("running", "finished", "failed"):
                for head, h in self.heads.items():
                    grid.add_row(*self._head_row(head, h, stage.state, now))
        return grid

    def _head_row(self, name: str, h: _Head, train_state: str, now: float) -> tuple:
        label = Text(self._label(name))
        if train_state == "finished":
            state = "finished"
        elif h.epoch and train_state == "running":
            state = "running"
        else:
            state = "pending"
        if not h.epoch:
            words = {"finished": "done", "pending": "waiting"}
            return (self._icon(state), label, "", Text(words.get(state, ""), style="dim"), "")
        total = h.epochs or h.epoch
        bar = ProgressBar(total=total, completed=total if state == "finished" else min(h.epoch, total),
                          width=BAR_WIDTH)
        of = f"/{h.epochs}" if h.epochs else ""
        if state == "finished":
            detail = Text(f"{h.epoch} epoch{'s' if h.epoch != 1 else ''}")
            best = f"  best val macro-F1 {_f1(h.best_f1)} @ epoch {h.best_epoch}"
        else:
            detail = Text(f"epoch {h.epoch}{of}  val macro-F1 {_f1(h.val_f1)}")
            best = f"  best {_f1(h.best_f1)} @ epoch {h.best_epoch}"
        if h.best_epoch is not None:
            detail.append(best, style="green")
        elapsed = now - h.started if state == "running" and h.started else None
        return (self._icon(state), label, bar, detail, Text(_seconds(elapsed), style="dim"))

    # ------------------------------------------------------------------ running
    def _say(self, lines: list[str]) -> None:
        if not self.terminal.live:
            for line in lines:
                self.terminal.line(line)

    def _watch(self) -> None:
        while not self._stop.wait(self._poll_seconds):
            self._say(self.poll())

    def __enter__(self) -> RunDisplay:
        with self._lock:
            start = self.stages[START]
            if start.state == "pending":
                start.state, start.started = "running", time.time()
        self._say([f"{TITLES[START]} ..."])
        if self.terminal.live:
            from rich.live import Live

            self._live = Live(self, console=self.terminal.console, refresh_per_second=8, transient=False)
            self._live.start()
        self._thread = threading.Thread(target=self._watch, name="crossmodal-display", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._say(self.poll())
        if exc is not None:
            with self._lock:  # a stage that never said it failed (the process was interrupted) did
                for stage in self.stages.values():
                    if stage.state == "running":
                        stage.state = "failed"
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
