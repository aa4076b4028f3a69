"""The command line: help, clear errors for bad input (no tracebacks), promote/rollback messages."""

import json
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from crossmodal.artifacts import METRICS_FILE
from crossmodal.cli import app

runner = CliRunner()


@pytest.fixture
def flow_calls(monkeypatch, tmp_path):
    """Stand in for the Prefect flow behind `crossmodal run` and `crossmodal demo` (flows.training.run_training):
    each call appends (config overrides, force, progress options) and returns a result with no metrics, so the
    report is a few lines. Runs in tmp_path, where the default manifest (data/demo/manifest.csv) has a header."""
    import flows.training

    calls = []
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "demo").mkdir(parents=True)
    (tmp_path / "data" / "demo" / "manifest.csv").write_text("id,image,text,label\n")
    work = tmp_path / "work"
    (work / "reports").mkdir(parents=True)
    (work / "reports" / METRICS_FILE).write_text("null")

    def run_training(params_path, overrides=None, summary_path=None, force=False, **options):
        calls.append((overrides, force, options))
        return {"work_dir": str(work), "rows": {"in": 0, "kept": 0, "quarantined": 0}, "best_head": "concat"}

    monkeypatch.setattr(flows.training, "run_training", run_training)
    return calls


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "crossmodal.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("run", "demo", "validate", "extract", "train", "evaluate", "register", "predict", "promote",
                "rollback", "history", "schedule", "ui", "demo-data", "runs", "config"):
        assert cmd in out.stdout


def test_help_does_not_import_heavy_libraries():
    code = "import sys, crossmodal.cli; print(sorted(m for m in ('torch','mlflow','prefect') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def _err(result):
    return result.output + (result.stderr if hasattr(result, "stderr") else "")


def test_missing_manifest_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["validate", "--manifest", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "o"),
                                 "--params", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2
    assert "error:" in _err(result) and "missing.csv" in _err(result)
    assert "Traceback" not in _err(result)


def test_unknown_column_mapping_is_a_clear_error(tmp_path):
    (tmp_path / "m.csv").write_text("image,text,label\na.jpg,hello,x\n")
    result = runner.invoke(app, ["validate", "--manifest", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o"),
                                 "--text-column", "caption", "--params", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2
    assert "caption" in _err(result) and "Traceback" not in _err(result)


def test_bad_params_file_is_a_clear_error(tmp_path):
    (tmp_path / "p.yaml").write_text("train:\n  optimiser: adam\n")
    result = runner.invoke(app, ["run", "--params", str(tmp_path / "p.yaml")])
    assert result.exit_code == 2 and "train.optimiser: unknown key" in _err(result)


def test_unknown_head_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["run", "--heads", "concat,nope", "--params", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "nope" in _err(result)


def test_promote_and_rollback_without_a_model(mlflow_store, tmp_path):
    result = runner.invoke(app, ["promote", "--version", "3", "--params", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "cannot promote" in _err(result)
    result = runner.invoke(app, ["rollback", "--params", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "no registered model" in _err(result)


def test_schedule_needs_a_server(monkeypatch, tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        result = runner.invoke(app, ["schedule", "--cron", "0 3 * * *", "--params", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "prefect server start" in _err(result)
    result = runner.invoke(app, ["schedule", "--cron", "not a cron"])
    assert result.exit_code == 2 and "Invalid cron" in _err(result)


def test_run_options_for_losses_balancing_and_stacking_reach_the_config(tmp_path, flow_calls):
    from crossmodal.config import load_config

    result = runner.invoke(app, ["run", "--params", str(tmp_path / "none.yaml"), "--loss", "focal",
                                 "--focal-gamma", "1.5", "--aux-loss-weight", "0.2", "--ogm-ge", "--ogm-alpha", "0.7",
                                 "--stacking-meta", "mlp"])
    assert result.exit_code == 0, _err(result)
    seen = flow_calls[-1][0]
    train = load_config(None, seen).train
    assert (train.loss, train.focal_gamma, train.aux_loss_weight) == ("focal", 1.5, 0.2)
    assert train.ogm_ge.enabled and train.ogm_ge.alpha == 0.7 and train.stacking.meta == "mlp"
    bad = runner.invoke(app, ["run", "--params", str(tmp_path / "none.yaml"), "--loss", "hinge"])
    assert bad.exit_code == 2 and "train.loss" in _err(bad) and "Traceback" not in _err(bad)


def test_run_force_and_epochs_reach_the_flow(tmp_path, flow_calls):
    from crossmodal.config import load_config

    calls = flow_calls
    for args, force in ((["--force", "--epochs", "7"], True), ([], False)):
        result = runner.invoke(app, ["run", "--params", str(tmp_path / "none.yaml"), *args])
        assert result.exit_code == 0, _err(result)
        assert calls[-1][1] is force
    assert load_config(None, calls[0][0]).train.max_epochs == 7
    result = runner.invoke(app, ["demo", "--help"])
    assert "--force" in result.output


def test_config_show_says_where_each_value_came_from(tmp_path):
    params = tmp_path / "p.yaml"
    params.write_text("train:\n  lr: 0.01\n")
    result = runner.invoke(app, ["config", "show", "--params", str(params), "--set", "train.max_epochs=3"])
    assert result.exit_code == 0, _err(result)
    lines = result.output.splitlines()
    assert "train:" in lines
    assert any(line.split("#")[0].strip() == "max_epochs: 3" and line.endswith("# --set") for line in lines)
    assert any(line.split("#")[0].strip() == "lr: 0.01" and line.endswith(f"# {params}") for line in lines)
    assert any(line.split("#")[0].strip() == "patience: 8" and line.endswith("# default") for line in lines)

    as_json = runner.invoke(app, ["config", "show", "--json", "--params", str(params), "--set",
                                  "train.heads=[concat,gated]", "--set", "mlflow.tracking_uri=http://me:pw@host:5000"])
    assert as_json.exit_code == 0, _err(as_json)
    shown = json.loads(as_json.output)
    assert shown["config"]["train"]["heads"] == ["concat", "gated"] and shown["sources"]["train.heads"] == "--set"
    assert shown["config"]["train"]["lr"] == 0.01 and shown["sources"]["train.lr"] == str(params)
    assert "pw" not in as_json.output  # credentials in a URI are not printed

    bad = runner.invoke(app, ["config", "show", "--params", str(params), "--set", "train.max_epoch=3"])
    assert bad.exit_code == 2 and "Traceback" not in _err(bad)
    assert "--set train.max_epoch=3: unknown setting train.max_epoch (did you mean train.max_epochs?)" in _err(bad)


def test_set_reaches_validate_and_wins_over_its_options(tmp_path, good_rows, write_csv):
    rows = [{**r, "caption": r.pop("text")} for r in good_rows(tmp_path, 12)]
    manifest = write_csv(tmp_path / "m.csv", rows)
    base = ["validate", "--manifest", str(manifest), "--out", str(tmp_path / "o"), "--params", str(tmp_path / "none")]
    result = runner.invoke(app, [*base, "--text-column", "text", "--set", "data.columns.text=caption"])
    assert result.exit_code == 0, _err(result)
    assert "rows: 12 in = 12 kept + 0 quarantined" in result.output
    refused = runner.invoke(app, [*base, "--set", "validation.min_rows_per_class=0"])
    assert refused.exit_code == 2 and "Traceback" not in _err(refused)
    assert "--set validation.min_rows_per_class=0: Input should be greater than or equal to 1" in _err(refused)
    malformed = runner.invoke(app, [*base, "--set", "validation.min_rows_per_class"])
    assert malformed.exit_code == 2 and "expected KEY=VALUE" in _err(malformed)


# ----------------------------------------------------------------------------- what the terminal shows
def test_run_with_a_missing_manifest_fails_at_once_in_one_line(tmp_path):
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "crossmodal.cli", "run", "--manifest", "/nonexistent.csv"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    seconds = time.perf_counter() - start
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == ["error: manifest /nonexistent.csv not found (--manifest or data.manifest)"]
    assert out.stdout == ""
    assert seconds < 10  # checked before Prefect's temporary API (5-12 s to start here) or MLflow


def test_a_missing_column_is_one_line_naming_the_option_and_the_setting(tmp_path, flow_calls):
    (tmp_path / "m.csv").write_text("id,image,text,label\n")
    none = str(tmp_path / "none.yaml")
    result = runner.invoke(app, ["run", "--manifest", str(tmp_path / "m.csv"), "--text-column", "title",
                                 "--params", none])
    assert result.exit_code == 2 and not flow_calls
    assert result.output.splitlines() == [
        "error: column 'title' not in m.csv (--text-column or data.columns.text); columns: id, image, text, label"]
    predict = runner.invoke(app, ["predict", "--manifest", str(tmp_path / "m.csv"), "--image-column", "picture",
                                  "--params", none])
    assert predict.exit_code == 2
    assert predict.output.splitlines() == [
        "error: column 'picture' not in m.csv (--image-column or data.columns.image); columns: id, image, text, label"]


def test_a_user_error_inside_the_flow_is_printed_once(monkeypatch, tmp_path, flow_calls, capfd):
    import logging

    import flows.training
    from crossmodal.errors import ValidationFailed

    def failing_run(*args, **kwargs):
        # What Prefect's engine logs when a task and then its flow fail, before the error reaches the caller.
        logging.getLogger("prefect.task_runs").error("Finished in state Failed('Task run encountered an exception "
                                                     "ValidationFailed: 9 of 10 rows quarantined')")
        logging.getLogger("prefect.flow_runs").error("Finished in state Failed('Flow run encountered an exception "
                                                     "ValidationFailed: 9 of 10 rows quarantined')")
        raise ValidationFailed("9 of 10 rows quarantined (validation.max_quarantine_fraction: 0.2); see quarantine.csv")

    monkeypatch.setattr(flows.training, "run_training", failing_run)
    result = runner.invoke(app, ["run", "--params", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2
    shown = result.output + capfd.readouterr().err
    assert shown.count("9 of 10 rows quarantined") == 1 and shown.count("error:") == 1, shown
    assert "Traceback" not in shown and "Finished in state" not in shown


def test_run_ends_with_the_tables_in_plain_text_off_a_terminal_or_with_plain(monkeypatch, tmp_path, flow_calls):
    heads = {name: {"modality": modality, "family": "frozen", "ece_calibrated": 0.02,
                    "test": {"accuracy": f1, "macro_f1": f1, "roc_auc": f1, "ece": 0.05},
                    "missing_text": {"macro_f1": f1 / 2}, "missing_image": {"macro_f1": f1 / 3}}
             for name, modality, f1 in (("concat", "fusion", 0.8), ("text_only", "text", 0.7),
                                        ("linear_probe", "fusion", 0.75), ("traditional_concat", "fusion", 0.6))}
    heads["traditional_concat"].update(family="traditional", variant="tfidf+sift_bovw+lda")
    metrics = {"heads": heads, "best_fusion": "concat", "best_unimodal": "text_only", "fusion_gain_macro_f1": 0.1,
               "fusion_gain_over_linear_probe": 0.05,
               "fusion_gain_interval": {"over_unimodal": {"delta": 0.1, "ci_low": 0.02, "ci_high": 0.18,
                                                          "confidence": 0.95, "n_rows": 300},
                                        "over_linear_probe": None}}
    (tmp_path / "work" / "reports" / METRICS_FILE).write_text(json.dumps(metrics))
    base = ["run", "--params", str(tmp_path / "none.yaml")]

    piped = runner.invoke(app, base)
    assert piped.exit_code == 0, _err(piped)
    assert "\x1b[" not in piped.output and "─" not in piped.output
    lines = piped.output.splitlines()
    assert "comparison (test rows)" in lines and any(line.startswith("concat ") and "|" in line for line in lines)
    assert ("best fusion concat beats best unimodal text_only by +10.0 macro-F1 points "
            "(95% CI +2.0 to +18.0 points, 300 test rows)") in lines
    assert "best fusion concat beats linear_probe by +5.0 macro-F1 points" in lines
    assert any(line.startswith("traditional_concat [tfidf+sift_bovw+lda] ") for line in lines)
    assert lines[-3:] == ["rows: 0 in = 0 kept + 0 quarantined", "model: best head concat (not registered)",
                          "summary: reports/summary.json"]
    options = flow_calls[-1][2]
    assert options["progress_bars"] is False and "progress" in options["progress_dir"]  # bars only with --verbose

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # Rich takes the output for a terminal
    on_terminal = runner.invoke(app, base)
    assert on_terminal.exit_code == 0, _err(on_terminal)
    assert "─" in on_terminal.output and "\x1b[" in on_terminal.output
    plain = runner.invoke(app, [*base, "--plain"])
    assert plain.exit_code == 0 and "\x1b[" not in plain.output and "─" not in plain.output
    assert "comparison (test rows)" in plain.output
    verbose = runner.invoke(app, [*base, "--plain", "--verbose"])
    assert verbose.exit_code == 0 and flow_calls[-1][2]["progress_bars"] is True
