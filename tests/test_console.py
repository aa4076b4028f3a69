"""What the terminal shows: the live display driven by progress files written as the flow writes them, the result
tables in Rich and in plain text, one-line warnings, and the libraries' chatter held back."""

from __future__ import annotations

import io
import logging
import time
import warnings

import pytest
from rich.console import Console

from crossmodal.console.chatter import is_chatter, quiet_libraries
from crossmodal.console.display import RunDisplay, head_plan
from crossmodal.console.report import comparison_table, show_run
from crossmodal.console.terminal import Terminal, one_line
from crossmodal.training.progress import epoch_writer, event_writer

PLAN = {"concat": 25, "text_only": 25, "finetune_xattn": 2, "traditional_text": None}


def _rich_terminal(width: int = 120) -> Terminal:
    return Terminal(file=io.StringIO(), force_terminal=True, width=width, record=True)


def _screen(term: Terminal, renderable) -> str:
    term.console.print(renderable)
    return term.console.export_text()


def _first_steps(folder) -> None:
    """A run part-way: validated, extraction half done for images, concat at its third epoch."""
    stages, extract = event_writer(folder, "stages"), event_writer(folder, "extract")
    stages({"stage": "validate", "state": "started"})
    stages({"stage": "validate", "state": "finished", "seconds": 1.25, "rows_in": 126, "rows_kept": 120,
            "rows_quarantined": 6})
    stages({"stage": "extract", "state": "started"})
    extract({"kind": "image", "done": 64, "total": 120})
    extract({"kind": "text", "done": 120, "total": 120})
    stages({"stage": "train", "state": "started"})
    concat = epoch_writer(folder, "concat")
    for epoch, f1 in enumerate([0.5, 0.62, 0.6], start=1):
        concat({"epoch": epoch, "train_loss": 0.9, "val_loss": 0.8, "val_macro_f1": f1})


def test_display_shows_stages_extraction_and_epochs_from_the_files(tmp_path):
    _first_steps(tmp_path)
    term = _rich_terminal()
    display = RunDisplay(tmp_path, term, PLAN)
    display.poll()
    screen = _screen(term, display)
    assert "126 rows in = 120 kept + 6 quarantined" in screen
    images = next(line for line in screen.splitlines() if "images" in line)
    assert "64/120" in images and "━" in images
    concat = next(line for line in screen.splitlines() if "concat" in line)
    assert "epoch 3/25" in concat and "val macro-F1 0.600" in concat and "best 0.620 @ epoch 2" in concat
    assert "finetune_xattn (fine-tuning)" in screen
    assert "waiting" in next(line for line in screen.splitlines() if "text_only" in line)
    assert "publish" in screen  # the stages still to come are listed

    stages = event_writer(tmp_path, "stages")
    stages({"stage": "extract", "state": "finished", "seconds": 9.0, "encoded": {"image": 120, "text": 118},
            "reused": {"image": 0, "text": 2}, "views": {"views": 2, "rows": 84, "encoded": 168}})
    epoch_writer(tmp_path, "text_only")({"epoch": 1, "val_macro_f1": 0.7})
    stages({"stage": "train", "state": "finished", "seconds": 61.0})
    stages({"stage": "evaluate", "state": "cached", "seconds": 0.2})
    lines = display.poll()  # only what is new
    assert lines[0] == "extract features: done in 9.0 s (encoded 120 images, 118 texts; from the store 0 images, " \
                       "2 texts; 2 augmented views of 84 training rows, 168 encoded)"
    assert "train heads: done in 1m01s" in lines
    assert "  concat: 3 epochs, best val macro-F1 0.620 (epoch 2)" in lines
    assert "  text_only: 1 epoch, best val macro-F1 0.700 (epoch 1)" in lines
    assert "evaluate: cached in 0.2 s" in lines
    assert display.poll() == []
    screen = _screen(_rich_terminal(), display)
    assert "3 epochs" in next(line for line in screen.splitlines() if "concat" in line)
    assert "cached" in next(line for line in screen.splitlines() if "evaluate" in line)


def test_display_prints_plain_lines_while_the_run_goes_on(tmp_path):
    out = io.StringIO()
    term = Terminal(plain=True, file=out)
    with RunDisplay(tmp_path, term, PLAN, poll_seconds=0.02):
        _first_steps(tmp_path)
        deadline = time.time() + 5
        while "train heads ..." not in out.getvalue() and time.time() < deadline:
            time.sleep(0.02)
        event_writer(tmp_path, "stages")({"stage": "train", "state": "finished", "seconds": 2.0})
    text = out.getvalue()
    assert "\x1b[" not in text
    lines = text.splitlines()
    assert lines[:3] == ["start flow ...", lines[1], "validate ..."] and lines[1].startswith("start flow: done in")
    assert "validate: done in 1.2 s (126 rows in = 120 kept + 6 quarantined)" in lines
    assert "  concat: 3 epochs, best val macro-F1 0.620 (epoch 2)" in lines
    assert lines.count("train heads: done in 2.0 s") == 1


def test_display_marks_the_running_stage_failed_when_the_run_raises(tmp_path):
    term = _rich_terminal()
    with pytest.raises(RuntimeError), RunDisplay(tmp_path, term, {"concat": 5}, poll_seconds=0.02) as display:
        event_writer(tmp_path, "stages")({"stage": "validate", "state": "started"})
        raise RuntimeError("interrupted")
    assert display.stages["validate"].state == "failed"
    screen = _screen(_rich_terminal(), display)
    assert "✗ validate" in screen


def test_head_plan_follows_the_settings(tiny_config, tmp_path):
    cfg = tiny_config(tmp_path, train={"heads": ["concat", "finetune_xattn", "traditional_text"], "max_epochs": 7})
    assert head_plan(cfg) == {"concat": 7, "finetune_xattn": cfg.train.finetune.epochs, "traditional_text": None}
    cfg.train.finetune.enabled = False
    assert list(head_plan(cfg)) == ["concat", "traditional_text"]


# ----------------------------------------------------------------------------- tables
def _head(modality, f1, ece, *, missing_text=None, missing_image=None):
    return {"modality": modality, "family": "frozen", "test": {"accuracy": f1 + 0.01, "macro_f1": f1,
            "roc_auc": f1 + 0.1, "ece": ece}, "ece_calibrated": ece / 2,
            "missing_text": {"macro_f1": missing_text}, "missing_image": {"macro_f1": missing_image}}


METRICS = {"heads": {"image_only": _head("image", 0.58, 0.10, missing_text=0.58),
                     "text_only": _head("text", 0.69, 0.04, missing_image=0.69),
                     "concat": _head("fusion", 0.84, 0.06, missing_text=0.5, missing_image=0.6)},
           "best_fusion": "concat", "best_unimodal": "text_only", "fusion_gain_macro_f1": 0.15}
SUMMARY = {"rows": {"in": 126, "kept": 120, "quarantined": 6, "quarantine_file": "/r/quarantine.csv"},
           "registered_head": "concat", "best_head": "concat",
           "mlflow": {"model_name": "demo", "version": "2", "champion_version": "1"},
           "promotion": {"promoted": True, "reason": "macro-F1 +0.040 [0.010, 0.070]"}, "report": "/r/report.html"}


def _styles_of(table, text: str) -> list:
    console = Console(width=140, force_terminal=True, color_system="truecolor")
    return [seg.style for seg in console.render(table) if seg.text.strip() == text]


def test_rich_comparison_highlights_the_best_of_each_column():
    table = comparison_table(METRICS, rich=True, registered="concat")
    (best_f1,) = _styles_of(table, "0.840")
    assert best_f1.bold and best_f1.color.name == "green"
    (worse_f1,) = _styles_of(table, "0.690")
    assert not (worse_f1 and worse_f1.bold)
    (lowest_ece,) = _styles_of(table, "0.040")  # text_only's: for ECE, lower is better
    assert lowest_ece.bold
    plain = comparison_table(METRICS, rich=False)
    assert all(not (s and s.bold) for s in _styles_of(plain, "0.840"))


def test_run_report_in_rich_and_in_plain_text():
    term = _rich_terminal()
    show_run(term, SUMMARY, METRICS, "reports/summary.json")
    rich_text = term.console.export_text(styles=True)
    assert "\x1b[" in rich_text and "─" in rich_text

    out = io.StringIO()
    show_run(Terminal(plain=True, file=out), SUMMARY, METRICS, "reports/summary.json")
    text = out.getvalue()
    assert "\x1b[" not in text and "─" not in text
    lines = text.splitlines()
    ranked = [line.split("|")[0].strip() for line in lines if line.count("|") == 7]  # the comparison's rows
    assert ranked == ["head", "concat *", "text_only", "image_only"]  # best test macro-F1 first, registered marked
    assert "-+-" in text  # an ASCII rule under each header
    assert "best fusion concat beats best unimodal text_only by +15.0 macro-F1 points (* registered: concat)" in lines
    assert lines[-4:] == ["rows: 126 in = 120 kept + 6 quarantined (see /r/quarantine.csv)",
                          "model: demo version 2 (concat) PROMOTED to champion: macro-F1 +0.040 [0.010, 0.070]",
                          "report: /r/report.html", "summary: reports/summary.json"]


def test_plain_is_the_default_off_a_terminal_and_on_request():
    assert not Terminal(file=io.StringIO()).rich  # piped
    assert Terminal(file=io.StringIO(), force_terminal=True).rich
    assert not Terminal(plain=True, file=io.StringIO(), force_terminal=True).rich
    assert not Terminal(file=io.StringIO(), force_terminal=True, verbose=True).live  # libraries print their lines


# ----------------------------------------------------------------------------- warnings and chatter
def test_a_warning_is_one_line_cut_to_the_terminal_with_the_count_left_out():
    message = ("3 identical texts appear in more than one split (7 rows), e.g. ids [['a', 'b'], ['c', 'd'], "
               "['e', 'f']]: near-leakage between train and evaluation")
    cut = one_line(message, 60)
    assert len(cut) <= 60 and cut.endswith(" chars)")
    kept, hidden = cut.split("… (+")
    shown = len(message) - int(hidden.split()[0])  # what the count says was shown, a trailing space included
    assert message.startswith(kept) and len(kept) <= shown <= len(kept) + 1
    assert one_line("two\n  lines") == "two lines"
    term = _rich_terminal(width=70)
    term.warn(message)
    (line,) = term.console.export_text().splitlines()
    assert line.startswith("warning: 3 identical texts") and len(line) <= 70
    out = io.StringIO()
    Terminal(plain=True, file=out).warn("a\nlong\nwarning")
    assert out.getvalue() == "warning: a long warning\n"


def _record(name: str, level: int, msg: str = "m") -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, None, None)


def test_chatter_is_what_the_libraries_say_below_warning_and_the_engines_failure_echo():
    assert is_chatter(_record("prefect", logging.INFO, "Starting temporary server on http://127.0.0.1:8"))
    assert is_chatter(_record("mlflow.store.db.utils", logging.INFO, "Creating initial MLflow database tables..."))
    assert is_chatter(_record("prefect.task_runs", logging.ERROR, "Finished in state Failed('DataError')"))
    assert not is_chatter(_record("crossmodal.validation.validate", logging.WARNING, "near-leakage"))
    assert not is_chatter(_record("prefect.client", logging.ERROR, "cannot reach the API"))


def test_quiet_libraries_routes_warnings_to_one_line_and_drops_chatter(capfd):
    said: list[tuple[str, str]] = []
    root_handlers = list(logging.getLogger().handlers)
    with quiet_libraries(lambda message, level: said.append((level, message))):
        from mlflow.utils.logging_utils import eprint

        logging.getLogger("prefect").info("Starting temporary server on http://127.0.0.1:4200")
        logging.getLogger("prefect.task_runs").error("Finished in state Failed('Task run encountered an exception')")
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
        logging.getLogger("mlflow.tracking").warning("the registry is slow")
        eprint("Successfully registered model 'demo'.")
        for _ in range(2):
            logging.getLogger("crossmodal.validation.validate").warning("2 identical texts appear in more\nthan one")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("a library's warning", UserWarning, stacklevel=1)
    assert said == [("warning", "the registry is slow"), ("warning", "2 identical texts appear in more\nthan one"),
                    ("warning", "UserWarning: a library's warning")]
    err = capfd.readouterr().err
    for chatter in ("Starting temporary server", "Finished in state", "database tables", "Successfully registered"):
        assert chatter not in err
    assert logging.getLogger().handlers == root_handlers  # left as found
    with quiet_libraries(lambda message, level: said.append((level, message)), verbose=True):
        logging.getLogger("crossmodal.x").warning("verbose: the libraries' own handlers print this")
    assert said[-1][1] == "UserWarning: a library's warning"
