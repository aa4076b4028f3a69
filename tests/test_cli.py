"""The command line: help, clear errors for bad input (no tracebacks), promote/rollback messages."""

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from crossmodal.artifacts import METRICS_FILE
from crossmodal.cli import app

runner = CliRunner()


@pytest.fixture
def flow_calls(monkeypatch, tmp_path):
    """Stand in for the Prefect flow behind `crossmodal run` and `crossmodal demo` (flows.training.run_training):
    each call appends (config overrides, force) and returns a result with no metrics, so the report is one line."""
    import flows.training

    calls = []
    work = tmp_path / "work"
    (work / "reports").mkdir(parents=True)
    (work / "reports" / METRICS_FILE).write_text("null")

    def run_training(params_path, overrides=None, summary_path=None, force=False):
        calls.append((overrides, force))
        return {"work_dir": str(work), "rows": {"in": 0, "kept": 0, "quarantined": 0}, "best_head": "concat"}

    monkeypatch.setattr(flows.training, "run_training", run_training)
    return calls


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "crossmodal.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for cmd in ("run", "demo", "validate", "extract", "train", "evaluate", "register", "promote", "rollback",
                "schedule", "ui", "demo-data"):
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
