"""Where a command's output goes and in which form: Rich on a terminal, plain text when stdout is piped or with
``--plain``; the libraries' own logs and bars only with ``--verbose``.

    from crossmodal.console.terminal import Terminal
    term = Terminal(plain=False, verbose=False)
    term.rich                      # True on a terminal without --plain
    term.print(table)              # a Rich renderable, or text
    term.warn("3 identical texts appear in more than one split ...")   # one line, cut to the terminal's width

Warnings are one line each: a long one is cut at the terminal's width and says how much was left out (the whole
text is in the run's files, e.g. ``validation.json``, and in the ``--verbose`` log). Plain output never cuts, so a
log file keeps every word, but still folds a message onto one line.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from rich.console import Console
from rich.text import Text

PLAIN_WIDTH = 200  # wide enough that plain tables never wrap; they are only as wide as their content


def one_line(text: str, width: int | None = None) -> str:
    """``text`` folded onto one line; cut to ``width`` characters with the count of the ones left out."""
    flat = " ".join(str(text).split())
    if width is None or len(flat) <= width:
        return flat
    keep = max(width - len(f"… (+{len(flat)} chars)"), 1)  # room for the longest count the suffix can show
    return flat[:keep].rstrip() + f"… (+{len(flat) - keep} chars)"


class Terminal:
    """A command's output: ``rich`` (a terminal, no ``plain``) or plain text; ``verbose`` lets library logs through.

    ``file``/``force_terminal``/``width`` are for tests and recordings (``record=True`` keeps what was printed
    for ``console.save_svg``).
    """

    def __init__(self, plain: bool = False, verbose: bool = False, file: IO[str] | None = None,
                 force_terminal: bool | None = None, width: int | None = None, record: bool = False):
        probe = Console(file=file, force_terminal=force_terminal, width=width)
        self.rich = not plain and probe.is_terminal
        self.verbose = verbose
        if self.rich:
            self.console = Console(file=file, force_terminal=force_terminal, width=width, record=record,
                                   highlight=False)
        else:
            self.console = Console(file=file, force_terminal=False, no_color=True, highlight=False,
                                   width=width or PLAIN_WIDTH, record=record, soft_wrap=True)
        self._file = file

    @property
    def live(self) -> bool:
        """Whether a live display may redraw the screen: Rich, and no library writing its own lines under it."""
        return self.rich and not self.verbose

    def print(self, *objects: Any, style: str | None = None) -> None:
        self.console.print(*objects, style=style)

    def line(self, text: str, style: str | None = None) -> None:
        """One line of text, printed as is (no markup): a path or a message may hold brackets."""
        self.console.print(Text(text, style=style or ""), soft_wrap=True)

    def warn(self, message: str, level: str = "warning") -> None:
        """One line ``warning: ...`` (or ``error: ...``): on the display's console on a terminal (a live display
        keeps it above itself), on stderr when plain."""
        if self.rich:
            text = one_line(message, self.console.width - len(level) - 2)
            self.console.print(Text(f"{level}: {text}", style="yellow" if level == "warning" else "red"),
                               soft_wrap=True)
        else:
            print(f"{level}: {one_line(message)}", file=self._file if self._file is not None else sys.stderr,
                  flush=True)
