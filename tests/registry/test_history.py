"""The champion's history: every move (gate, promote, rollback) kept, through the command line; rollback follows the
history back, move by move; the old comma-list tag is read as legacy entries.

The versions here are bare version records: promote and rollback move aliases and never load a model.
"""

import json
from datetime import datetime

import pytest
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from crossmodal.cli import app
from crossmodal.errors import PromotionError
from crossmodal.registry import promotion
from crossmodal.registry.history import LEGACY_TAG, MAX_REASON_CHARS, read_history

runner = CliRunner()


@pytest.fixture
def three_versions(mlflow_store, tmp_path):
    """A registered model with versions 1, 2 and 3 and no champion yet; returns its name. Version records only:
    moving an alias never loads a model."""
    name, client = "history-test", MlflowClient()
    client.create_registered_model(name)
    for _ in range(3):
        client.create_model_version(name, (tmp_path / "model").as_uri())
    return name


def _cli(*args, params):
    result = runner.invoke(app, [*args, "--params", str(params), "--model-name", "history-test"])
    return result.exit_code, result.output + (result.stderr if hasattr(result, "stderr") else "")


def test_promote_rollback_and_history_keep_every_move(three_versions, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    params = tmp_path / "none.yaml"  # defaults: the store is $MLFLOW_TRACKING_URI (mlflow_store)
    for version, reason in (("1", "first release"), ("2", None), ("3", "fixes the night-time photos")):
        extra = ["--reason", reason] if reason else []
        code, out = _cli("promote", "--version", version, *extra, params=params)
        assert code == 0 and f"champion is now version {version}" in out, out
    assert promotion.current_champion(three_versions) == "3"

    code, out = _cli("rollback", params=params)
    assert code == 0 and "rolled back to version 2" in out, out
    code, out = _cli("rollback", "--reason", "2 mislabels receipts", params=params)
    assert code == 0 and "rolled back to version 1" in out, out
    assert promotion.current_champion(three_versions) == "1"
    code, out = _cli("rollback", params=params)
    assert code == 2 and "no earlier champion" in out and "Traceback" not in out, out

    code, out = _cli("history", "--json", params=params)
    assert code == 0, out
    entries = json.loads(out)
    assert [(e["version"], e["previous"], e["action"], e["reason"]) for e in entries] == [
        ("1", None, "promote", "first release"),
        ("2", "1", "promote", "by hand"),
        ("3", "2", "promote", "fixes the night-time photos"),
        ("2", "3", "rollback", "rolled back by hand"),
        ("1", "2", "rollback", "2 mislabels receipts"),
    ]
    assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5]
    assert {e["by"] for e in entries} == {"alice"}
    assert all(datetime.fromisoformat(e["at"]).utcoffset().total_seconds() == 0 for e in entries)

    # A new move after rollbacks: rolling back returns to where the rollbacks had left the champion.
    assert _cli("promote", "--version", "3", params=params)[0] == 0
    assert _cli("rollback", params=params)[0] == 0
    assert promotion.current_champion(three_versions) == "1"
    assert len(read_history(three_versions)) == 7  # nothing was erased

    code, out = _cli("history", params=params)
    lines = out.splitlines()
    assert code == 0 and lines[0].split()[:4] == ["#", "version", "previous", "action"], out
    assert len(lines) == 8 and "fixes the night-time photos" in out and "alice" in out


def test_history_never_drops_entries(three_versions):
    """More moves than the old comma tag kept (50): every one is still there, in order."""
    for k in range(51):
        promotion.promote(three_versions, "12"[k % 2], reason=f"move {k}")
    history = read_history(three_versions)
    assert [e["reason"] for e in history] == [f"move {k}" for k in range(51)]
    assert [e["previous"] for e in history[:3]] == [None, "1", "2"]


def test_legacy_comma_tag_is_read_as_the_first_entries(three_versions):
    client = MlflowClient()
    client.set_registered_model_tag(three_versions, LEGACY_TAG, "1,3")  # what an older release left
    client.set_registered_model_alias(three_versions, promotion.CHAMPION, "3")
    promotion.promote(three_versions, "2", reason="after the upgrade")
    history = read_history(three_versions)
    assert [(e["version"], e["previous"], e["action"]) for e in history] == [
        ("1", None, "legacy"), ("3", "1", "legacy"), ("2", "3", "promote")]
    assert promotion.rollback(three_versions) == "3"
    assert promotion.rollback(three_versions) == "1"
    assert client.get_registered_model(three_versions).tags[LEGACY_TAG] == "1,3"  # left as it was


def test_rollback_after_the_alias_was_moved_elsewhere(three_versions):
    """Moved by hand in the MLflow UI (no entry): rollback returns to the last champion the history knows."""
    promotion.promote(three_versions, "1")
    promotion.promote(three_versions, "2")
    MlflowClient().set_registered_model_alias(three_versions, promotion.CHAMPION, "3")
    assert promotion.rollback(three_versions) == "2"
    assert read_history(three_versions)[-1]["previous"] == "3"
    assert promotion.rollback(three_versions) == "1"


def test_bad_requests_are_clear_errors(three_versions, tmp_path):
    params = tmp_path / "none.yaml"
    with pytest.raises(PromotionError, match="cannot promote"):
        promotion.promote(three_versions, 99)
    with pytest.raises(PromotionError, match=f"at most {MAX_REASON_CHARS}"):
        promotion.promote(three_versions, 1, reason="x" * (MAX_REASON_CHARS + 1))
    assert read_history(three_versions) == [] and promotion.current_champion(three_versions) is None
    code, out = _cli("history", params=params)
    assert code == 0 and "never moved" in out
    result = runner.invoke(app, ["history", "--params", str(params), "--model-name", "nope"])
    assert result.exit_code == 2 and "no registered model named 'nope'" in result.output
