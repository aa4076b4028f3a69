"""What MLflow says in words after a registration (descriptions of the version, the model and the run) and the list
of recent pipeline runs (`crossmodal runs`). Each test has its own temporary store; the heads come from the tiny run.
"""

import json
import logging

from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from crossmodal.cli import app
from crossmodal.config import EncodersConfig
from crossmodal.registry.descriptions import NOTE_TAG, describe_registration, run_note, version_description
from crossmodal.registry.publish import publish
from crossmodal.registry.runs import recent_runs

runner = CliRunner()


def _metrics(**extra):
    heads = {"concat": {"modality": "fusion", "family": "frozen",
                        "test": {"n": 200, "macro_f1": 0.9125, "accuracy": 0.92, "roc_auc": 0.98, "ece": 0.03}},
             "text_only": {"modality": "text", "family": "frozen", "test": {"n": 200, "macro_f1": 0.85}},
             "traditional_text": {"modality": "text", "family": "traditional", "test": {"n": 200, "macro_f1": 0.7}}}
    return {"heads": heads, "labels": ["cat", "dog"], "best_fusion": "concat", "best_unimodal": "text_only",
            "best_head": "concat", "registered_head": "concat", "best_traditional": "traditional_text",
            "fusion_gain_macro_f1": 0.0625, **extra}


def test_the_texts_state_the_comparison_and_the_verdict():
    kept = {"promoted": False, "champion_version": "4", "reason": "challenger v5 vs champion v4 on macro_f1: +0.2 "
            "points, 95 % interval -1.0 to +1.4 on 300 rows (McNemar p = 0.70): not significant: not promoted"}
    note = run_note(_metrics(), "5", "m", kept)
    assert note.startswith("The best fusion head, `concat`, scored a test macro-F1 of 0.912 against 0.850 for the "
                           "best unimodal head, `text_only`: a fusion gain of +6.2 points.")
    assert "The best traditional baseline, `traditional_text`, scored 0.700." in note
    assert note.endswith(f"Registered `concat` as version 5 of `m`. Gate: not promoted, version 4 stays champion. "
                         f"Reason: {kept['reason']}.")
    assert "\n" not in note  # one paragraph
    text = version_description(_metrics(), "concat", {"promoted": True, "reason": "no champion yet"})
    assert "Head `concat`: predicts from image and text, on frozen encoder features." in text
    assert "Test (200 rows): macro-F1 0.912, accuracy 0.920, ROC AUC 0.980, ECE 0.030." in text
    assert text.endswith("Gate: promoted to champion. Reason: no champion yet.")
    alone = run_note(_metrics(best_fusion=None, fusion_gain_macro_f1=None, registered_head="text_only"), "1", "m",
                     {"promoted": True, "reason": "no champion yet"})
    assert alone.startswith("No fusion head was trained; the best unimodal head, `text_only`, scored a test "
                            "macro-F1 of 0.850.")


def test_a_description_that_cannot_be_written_never_fails_the_run(mlflow_store, caplog):
    with caplog.at_level(logging.WARNING, logger="crossmodal.registry.descriptions"):
        describe_registration("never-registered", "1", _metrics(), {"promoted": True, "reason": "no champion yet"},
                              EncodersConfig(), run_id="0" * 32)
    warned = [r.getMessage() for r in caplog.records]
    assert any("description of never-registered version 1 not written" in m for m in warned)
    assert any("description of never-registered not written" in m for m in warned)
    assert any(f"note of run {'0' * 32} not written" in m for m in warned)


def test_no_runs_yet(mlflow_store, tmp_path):
    cfg_params = ["--params", str(tmp_path / "none.yaml")]
    result = runner.invoke(app, ["runs", *cfg_params])
    assert result.exit_code == 0 and "no pipeline runs in experiment crossmodal yet" in result.output
    result = runner.invoke(app, ["runs", "--json", *cfg_params])
    assert result.exit_code == 0 and json.loads(result.output) == []


def test_registration_is_described_and_listed(tiny_run, mlflow_store, tmp_path):
    cfg = tiny_run["cfg"].model_copy(deep=True)
    cfg.mlflow.tracking_uri = mlflow_store
    cfg.mlflow.artifact_root = str(tmp_path / "artifacts")
    name, metrics = cfg.mlflow.model_name, tiny_run["metrics"]
    folders = (tiny_run["manifest"], tiny_run["validated_dir"], tiny_run["models"], tiny_run["reports"])
    first = publish(cfg, *folders)
    second = publish(cfg, *folders, force=True)  # fewer test rows than promotion.min_rows: refused, v1 stays
    assert (first["mlflow"]["version"], second["mlflow"]["version"]) == ("1", "2")
    assert second["promotion"]["promoted"] is False

    client = MlflowClient()
    head = metrics["registered_head"]
    v1, v2 = (client.get_model_version(name, v).description for v in ("1", "2"))
    assert v1.startswith(f"Head `{head}`:") and "macro-F1" in v1
    assert f"macro-F1 {metrics['heads'][head]['test']['macro_f1']:.3f}" in v1
    assert v1.endswith("Gate: promoted to champion. Reason: no champion yet.")
    assert v2.endswith(f"Gate: not promoted, version 1 stays champion. Reason: {second['promotion']['reason']}.")
    model = client.get_registered_model(name).description
    assert f"Predicts one of {len(metrics['labels'])} labels" in model
    assert all(f"`{label}`" in model for label in metrics["labels"])
    assert f"`{cfg.encoders.image.name}`" in model and f"`{cfg.encoders.text.name}`" in model
    note = client.get_run(second["mlflow"]["run_id"]).data.tags[NOTE_TAG]
    assert f"The best fusion head, `{metrics['best_fusion']}`" in note
    assert f"the best unimodal head, `{metrics['best_unimodal']}`" in note and "fusion gain of" in note
    assert f"Registered `{head}` as version 2 of `{name}`. Gate: not promoted" in note

    # A pipeline run whose model is already registered: its note says so, the versions keep their descriptions.
    live = client.create_run(client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id).info.run_id
    same = publish(cfg, *folders, run_id=live)
    assert same["unchanged"] is True and same["mlflow"]["version"] == "2"
    assert "Nothing was registered" in client.get_run(live).data.tags[NOTE_TAG]
    assert client.get_model_version(name, "2").description == v2

    listed = recent_runs(cfg.mlflow, limit=10)
    assert [r["run_id"] for r in listed] == [live, second["mlflow"]["run_id"], first["mlflow"]["run_id"]]
    assert [(r["version"], r["unchanged"], r["champion"], r["promoted"]) for r in listed] == [
        ("2", True, False, None), ("2", False, False, False), ("1", False, True, True)]
    registered = listed[2]
    assert registered["best_head"] == head and registered["status"] == "FINISHED"
    assert registered["macro_f1"] == metrics["heads"][head]["test"]["macro_f1"]
    assert registered["dataset"] == tiny_run["manifest"].parent.name
    assert registered["manifest"] == str(tiny_run["manifest"].resolve()) and registered["model_name"] == name
    assert [r["run_id"] for r in recent_runs(cfg.mlflow, limit=1)] == [live]

    params = tmp_path / "p.yaml"
    params.write_text(f"mlflow:\n  tracking_uri: {mlflow_store}\n")
    shown = runner.invoke(app, ["runs", "--json", "--params", str(params)])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output) == listed
    table = runner.invoke(app, ["runs", "--params", str(params), "--limit", "2"])
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0].split() == ["started", "(UTC)", "run", "data", "best", "head", "macro-F1", "version", "champion",
                                "status"]
    assert len(lines) == 3 and live in lines[1] and "2 (unchanged)" in lines[1]
    assert second["mlflow"]["run_id"] in lines[2] and f"{registered['macro_f1']:.3f}" in lines[2]
