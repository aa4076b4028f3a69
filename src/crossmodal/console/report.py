"""The end of a run on the terminal: the comparison and robustness tables (best values highlighted), then one line
each for the rows, the model and the gate's verdict, report.html and summary.json; and the result of ``predict``.

    from crossmodal.console.report import show_run
    show_run(term, summary, metrics, "reports/summary.json")     # term: crossmodal.console.terminal.Terminal

On a terminal the tables are Rich tables: the best value of each column in bold green (for ECE the lowest), the
registered head marked; plain output (piped, ``--plain``) is the same table in ASCII with no colour, so a log or a
test reads it as text. The wording of the lines follows ``crossmodal.registry.publish.render``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich import box
from rich.table import Table
from rich.text import Text

from crossmodal.console.terminal import Terminal
from crossmodal.evaluation.tables import interval_text

BEST = "bold green"
# (title, how to read it from a head's metrics, higher is better)
COMPARISON_COLUMNS: tuple[tuple[str, Callable[[dict], Any], bool], ...] = (
    ("accuracy", lambda m: (m.get("test") or {}).get("accuracy"), True),
    ("macro-F1", lambda m: (m.get("test") or {}).get("macro_f1"), True),
    ("AUC-ROC", lambda m: (m.get("test") or {}).get("roc_auc"), True),
    ("ECE", lambda m: (m.get("test") or {}).get("ece"), False),
    ("ECE-cal", lambda m: m.get("ece_calibrated"), False),
)
ROBUSTNESS_COLUMNS: tuple[tuple[str, Callable[[dict], Any], bool], ...] = (
    ("full", lambda m: (m.get("test") or {}).get("macro_f1"), True),
    ("without text", lambda m: (m.get("missing_text") or {}).get("macro_f1"), True),
    ("without image", lambda m: (m.get("missing_image") or {}).get("macro_f1"), True),
)


def short_path(path: str | Path) -> str:
    """``path`` relative to the working folder when it lies inside it (shorter to read), else as it is."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(path)


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _kind(m: dict) -> str:
    return "fusion" if m.get("modality") == "fusion" else "unimodal"


def _table(title: str, rich: bool) -> Table:
    return Table(title=title, title_justify="left", title_style="bold" if rich else "",
                 box=box.SIMPLE_HEAD if rich else box.ASCII, header_style="bold" if rich else "",
                 show_edge=False, pad_edge=False)


def _cells(heads: dict[str, dict], order: list[str], columns, rich: bool) -> dict[str, list[Text]]:
    """Each head's formatted cells; the best of each column (highest, or lowest where lower is better) bold green."""
    out: dict[str, list[Text]] = {n: [] for n in order}
    for _, read, higher in columns:
        values = {n: _number(read(heads[n])) for n in order}
        present = [v for v in values.values() if v is not None]
        best = (max(present) if higher else min(present)) if present else None
        for n in order:
            v = values[n]
            out[n].append(Text("n/a" if v is None else f"{v:.3f}",
                               style=BEST if rich and v is not None and v == best and len(present) > 1 else ""))
    return out


def _ranked(heads: dict[str, dict]) -> list[str]:
    def f1(name):
        v = _number((heads[name].get("test") or {}).get("macro_f1"))
        return -1.0 if v is None else v

    return sorted(heads, key=f1, reverse=True)  # stable: ties keep the evaluation's order


def comparison_table(metrics: dict, rich: bool = True, registered: str | None = None) -> Table:
    """Test metrics per head, best test macro-F1 first; ``registered`` (the head sent to the registry) marked."""
    heads = metrics["heads"]
    order = _ranked(heads)
    table = _table("comparison (test rows)", rich)
    table.add_column("head", no_wrap=True)
    table.add_column("family")
    table.add_column("kind")
    for title, _, _ in COMPARISON_COLUMNS:
        table.add_column(title, justify="right")
    cells = _cells(heads, order, COMPARISON_COLUMNS, rich)
    for n in order:
        mark = " *" if n == registered else ""
        variant = heads[n].get("variant")  # a traditional baseline's features and projection: tfidf+hog_color
        name = Text(n + (f" [{variant}]" if variant else "") + mark, style="bold" if rich and mark else "")
        table.add_row(name, heads[n].get("family", "frozen"), _kind(heads[n]), *cells[n])
    return table


def fusion_line(metrics: dict, registered: str | None = None) -> tuple[str, str]:
    """The line under the comparison: what fusion gains over the best single modality, as (text, style)."""
    fusion, unimodal = metrics.get("best_fusion"), metrics.get("best_unimodal")
    gain = _number(metrics.get("fusion_gain_macro_f1"))
    mark = f" (* registered: {registered})" if registered else ""
    if fusion and unimodal and gain is not None:
        verb = "beats" if gain >= 0 else "trails"
        return (f"best fusion {fusion} {verb} best unimodal {unimodal} by {100 * gain:+.1f} macro-F1 points"
                f"{interval_text(metrics, 'over_unimodal')}{mark}",
                "green" if gain >= 0 else "yellow")
    return f"fusion gain: n/a (needs a fusion head and a unimodal head with test rows){mark}", "yellow"


def probe_line(metrics: dict) -> tuple[str, str] | None:
    """What the best fusion head adds over ``linear_probe`` on the same features, as (text, style); None without
    a trained probe."""
    fusion, gain = metrics.get("best_fusion"), _number(metrics.get("fusion_gain_over_linear_probe"))
    if not fusion or gain is None:
        return None
    verb = "beats" if gain >= 0 else "trails"
    return f"best fusion {fusion} {verb} linear_probe by {100 * gain:+.1f} macro-F1 points" + interval_text(
        metrics, "over_linear_probe"), (
        "green" if gain >= 0 else "yellow")


def robustness_table(metrics: dict, rich: bool = True) -> Table:
    """Test macro-F1 per head with both modalities, without the text and without the image."""
    heads = metrics["heads"]
    order = list(heads)
    table = _table("robustness (test macro-F1 with a modality removed)", rich)
    table.add_column("head", no_wrap=True)
    table.add_column("kind")
    for title, _, _ in ROBUSTNESS_COLUMNS:
        table.add_column(title, justify="right")
    cells = _cells(heads, order, ROBUSTNESS_COLUMNS, rich)
    for n in order:
        table.add_row(n, _kind(heads[n]), *cells[n])
    return table


def run_lines(summary: dict[str, Any], summary_path: str | None = None) -> list[tuple[str, str]]:
    """The closing lines of a run as (text, style): rows, model and gate, report.html, summary.json."""
    lines: list[tuple[str, str]] = []
    rows = summary.get("rows") or {}
    if rows:
        lines.append((f"rows: {rows.get('in')} in = {rows.get('kept')} kept + {rows.get('quarantined')} quarantined"
                      + (f" (see {short_path(rows['quarantine_file'])})"
                         if rows.get("quarantined") and rows.get("quarantine_file") else ""), ""))
    ml = summary.get("mlflow") or {}
    registered = summary.get("registered_head") or summary.get("best_head")
    decision = summary.get("promotion") or {}
    if ml and summary.get("unchanged"):
        lines.append((f"model: unchanged since version {ml.get('version')} of {ml.get('model_name')} ({registered}): "
                      f"nothing registered, champion is version {ml.get('champion_version')}", ""))
    elif ml:
        model = f"model: {ml.get('model_name')} version {ml.get('version')} ({registered})"
        if decision.get("promoted"):
            lines.append((f"{model} PROMOTED to champion: {decision.get('reason')}", "bold green"))
        elif decision:
            lines.append((f"{model} is challenger, champion stays version {ml.get('champion_version')}: "
                          f"{decision.get('reason')}", "yellow"))
        else:
            lines.append((f"{model}; champion is version {ml.get('champion_version')}", ""))
    elif registered:
        lines.append((f"model: best head {registered} (not registered)", ""))
    if "report" in summary:
        lines.append((f"report: {short_path(summary['report'])}" if summary["report"] else
                      "report: not built (the warning above says why)", ""))
    if summary_path:
        lines.append((f"summary: {short_path(summary_path)}", ""))
    return lines


def show_run(terminal: Terminal, summary: dict[str, Any], metrics: dict | None, summary_path: str | None) -> None:
    """Print the end of a run: the tables (when there are metrics) and the closing lines."""
    rich = terminal.rich
    terminal.line("")  # apart from the progress above
    if metrics and metrics.get("heads"):
        registered = summary.get("registered_head")
        terminal.print(comparison_table(metrics, rich, registered))
        for text, style in filter(None, (fusion_line(metrics, registered), probe_line(metrics))):
            terminal.line(text, style if rich else None)
        terminal.line("")
        terminal.print(robustness_table(metrics, rich))
        terminal.line("")
    for text, style in run_lines(summary, summary_path):
        terminal.line(text, style if rich else None)


def show_prediction(terminal: Terminal, text: str) -> None:
    """Print ``predict``'s report (``crossmodal.pipeline.predict.render``); on a terminal a drift shows in red."""
    for line in text.splitlines():
        styled = Text(line)
        if terminal.rich:
            styled.highlight_words(["DRIFTED"], style="bold red")
            styled.highlight_words([" ok "], style="green")
        terminal.console.print(styled, soft_wrap=True)
