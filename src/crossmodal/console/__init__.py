"""What the terminal shows for ``crossmodal run``, ``demo`` and ``predict``: the live progress of a run
(``display``), the result tables and closing lines (``report``), one line per warning with the libraries' chatter
held back (``chatter``), the choice between Rich and plain text (``terminal``), and the checks of a command's
inputs made before any server starts (``preflight``).

    from crossmodal.console.terminal import Terminal
    term = Terminal(plain=False, verbose=False)       # Rich on a terminal, plain text when piped or --plain
"""
