"""The libraries' chatter, held back from a command's default output: what Prefect, MLflow and the rest log below
WARNING (the temporary API server starting and stopping, flow and task states, database creation and migrations,
system-metrics monitoring), and the engine's own report of a failed task or flow, whose error the CLI prints once.
Every other warning or error reaches the terminal as one line (``Terminal.warn``); ``--verbose`` shows it all as
the libraries print it.

    from crossmodal.console.chatter import quiet_libraries
    with quiet_libraries(term.warn):          # imports Prefect and MLflow with their logging routed here
        run_training(...)

Prefect attaches its console handler to the root logger when it is imported, unless the root logger has a handler
of the application's already; so the handler here goes on the root logger first and Prefect is imported after it,
which also keeps Prefect's "Stopping temporary server" line, logged at exit, off the screen. MLflow replaces the
handlers of its own loggers when imported: those are rerouted here once it is, and the stream it prints some
messages to directly ("Successfully registered model ...") is swapped for one that keeps nothing. A Prefect console handler
already on the root logger (Prefect imported earlier in the process) is muted for the block.
"""

from __future__ import annotations

import importlib
import logging
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

# The engine's account of a task or flow that failed: the exception itself reaches the CLI, which says it once.
ENGINE_LOGGERS = ("prefect.task_runs", "prefect.flow_runs", "prefect.engine")
# Loggers that keep their own handlers (``propagate = False``): MLflow's four.
OWN_HANDLER_LOGGERS = ("mlflow", "alembic", "sqlalchemy.engine", "huey")
LIBRARIES = ("prefect", "mlflow")


def is_chatter(record: logging.LogRecord) -> bool:
    """Whether the default output leaves ``record`` out."""
    if record.levelno < logging.WARNING:
        return True
    return record.levelno >= logging.ERROR and record.name.startswith(ENGINE_LOGGERS)


class OneLineWarnings(logging.Handler):
    """Hands every record that is not chatter to ``say(message, level)`` once; repeats of a message are dropped."""

    def __init__(self, say: Callable[[str, str], None]):
        super().__init__(logging.WARNING)
        # A formatter marks this as the application's handler, so Prefect leaves the root logger to it.
        self.setFormatter(logging.Formatter("%(message)s"))
        self.say = say
        self._seen: set[str] = set()

    def emit(self, record: logging.LogRecord) -> None:
        if is_chatter(record):
            return
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string in a library's call is not ours to raise
            message = str(record.msg)
        if record.name == "py.warnings":  # "file:line: Category: text\n  source line": the category and text
            message = next((ln.split(": ", 1)[-1] for ln in message.splitlines() if ln.strip()), message)
        if message in self._seen:
            return
        self._seen.add(message)
        try:
            self.say(message, "error" if record.levelno >= logging.ERROR else "warning")
        except Exception:  # noqa: BLE001
            self.handleError(record)


class _Mute(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


class _Reroute(logging.Filter):
    """On another handler: hand the record to ``target`` instead of letting that handler print it."""

    def __init__(self, target: logging.Handler):
        super().__init__()
        self.target = target

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= self.target.level:
            self.target.handle(record)
        return False


class _Drain:
    """A text stream that keeps nothing."""

    enabled = True

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


@contextmanager
def quiet_libraries(say: Callable[[str, str], None], libraries: Sequence[str] = LIBRARIES,
                    verbose: bool = False) -> Iterator[None]:
    """For the block: chatter left out, every other warning through ``say(message, level)`` as one line.

    ``libraries`` are imported inside (after the root handler is in place, see the module docstring). ``verbose``:
    leave logging as the libraries set it up (``--verbose``).
    """
    if verbose:
        yield
        return
    root = logging.getLogger()
    handler = OneLineWarnings(say)
    mute, reroute = _Mute(), _Reroute(handler)
    root.addHandler(handler)
    touched: list[tuple[logging.Handler, logging.Filter]] = []
    swapped: list = []
    showwarning = warnings.showwarning

    def one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
        say(f"{category.__name__}: {message}", "warning")

    # warnings.warn(...) too becomes one line. Set here rather than by logging.captureWarnings, whose module state
    # goes stale when something else (pytest, a library) restores warnings.showwarning behind its back.
    warnings.showwarning = one_line_warning
    try:
        for name in libraries:
            importlib.import_module(name)
        for h in root.handlers:
            if type(h).__name__ == "PrefectConsoleHandler":  # the root's records reach ``handler`` anyway
                h.addFilter(mute)
                touched.append((h, mute))
        for name in OWN_HANDLER_LOGGERS:
            for h in logging.getLogger(name).handlers:
                if all(h is not t for t, _ in touched):
                    h.addFilter(reroute)
                    touched.append((h, reroute))
        utils = sys.modules.get("mlflow.utils.logging_utils")
        if utils is not None and hasattr(utils, "MLFLOW_LOGGING_STREAM"):
            # Its direct prints ("Successfully registered model ..."): eprint looks the stream up at each call.
            # Not its on/off switch: MLflow turns that back on itself (an import of mlflow.types.responses does).
            swapped.append((utils, utils.MLFLOW_LOGGING_STREAM))
            utils.MLFLOW_LOGGING_STREAM = _Drain()
        yield
    finally:
        for utils, stream in swapped:
            utils.MLFLOW_LOGGING_STREAM = stream
        for h, f in touched:
            h.removeFilter(f)
        root.removeHandler(handler)
        warnings.showwarning = showwarning
