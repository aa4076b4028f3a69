"""The champion/challenger gate: compared only on test rows neither model learned from, refused below
promotion.min_rows or when a model's learned rows are unknown, decided by a paired bootstrap interval, recorded on the
run and the version; rows without an image or a text are scored from what they have.

Each test gets its own temporary MLflow store (mlflow_store); the heads come from the one tiny pipeline run. The
statistics themselves: tests/evaluation/test_comparison.py.
"""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from crossmodal.registry import promotion
from crossmodal.registry.history import read_history
from crossmodal.registry.learned_ids import (
    LEARNED_IDS_ARTIFACT,
    LEARNED_IDS_TAG,
    learned_ids_digest,
    read_learned_ids,
    version_learned_ids,
)


def _test_ids(rows) -> list[str]:
    return rows["id"].astype(str).tolist()


def test_gate_compares_only_rows_neither_learned_from(tiny_test_rows, learned_ids, register_head, gate_config):
    rows = tiny_test_rows()
    ids = _test_ids(rows)
    assert len(ids) >= 12, "the tiny run needs a few test rows for this test"
    cfg = gate_config(min_rows=5, bootstrap_resamples=500)
    name = "unseen-test"
    # The champion learned from 4 of the new test rows, the challenger from 4 others, 2 of them shared: 6 are out.
    champion_learned = learned_ids + ids[:4]
    v1, first, run1 = register_head(name, "concat", cfg, learned=champion_learned)
    assert (v1, first.promoted, first.reason) == ("1", True, "no champion yet")
    v2, second, run2 = register_head(name, "concat", cfg, learned=learned_ids + ids[2:6])
    n = len(ids) - 6
    assert (second.test, second.n_rows, second.champion_version) == ("paired_bootstrap", n, "1")
    # The same head twice: the same predictions, so exactly no difference, and no promotion.
    assert (second.delta, second.ci_low, second.ci_high, second.p_value) == (0.0, 0.0, 0.0, 1.0)
    assert not second.promoted and promotion.current_champion(name) == "1"
    assert second.reason == (f"challenger v2 vs champion v1 on macro_f1: +0.0 points, 95 % interval +0.0 to +0.0 on "
                             f"{n} rows (McNemar p = 1.00): not significant: not promoted")

    client = MlflowClient()
    run = client.get_run(run2)
    assert run.data.metrics["gate_n_rows"] == n and run.data.metrics["gate_delta"] == 0.0
    assert run.data.metrics["gate_p_value"] == 1.0
    assert {"gate_ci_low", "gate_ci_high"} <= set(run.data.metrics)
    assert run.data.tags["crossmodal.gate.test"] == "paired_bootstrap"
    assert run.data.tags["crossmodal.gate.n_rows"] == str(n)
    mv = client.get_model_version(name, v2)
    assert mv.tags["crossmodal.gate.n_rows"] == str(n) and mv.tags["crossmodal.gate.ci_low"] == "0.0"
    assert mv.tags["crossmodal.gate.p_value"] == "1.0" and mv.tags["crossmodal.gate.promoted"] == "False"
    assert mv.tags["crossmodal.run_id"] == run2

    # What each version learned from is on its run, with its digest on the run and the version.
    assert LEARNED_IDS_ARTIFACT in {a.path for a in client.list_artifacts(run1, "data")}
    assert read_learned_ids(run1) == frozenset(champion_learned)
    digest = learned_ids_digest(champion_learned)
    assert client.get_run(run1).data.tags[LEARNED_IDS_TAG] == digest
    assert client.get_model_version(name, v1).tags[LEARNED_IDS_TAG] == digest
    assert version_learned_ids(name, v1) == frozenset(champion_learned)
    assert version_learned_ids(name, v2) == frozenset(learned_ids + ids[2:6])


def test_gate_refuses_below_min_rows(tiny_test_rows, learned_ids, register_head, gate_config):
    rows = tiny_test_rows()
    ids = _test_ids(rows)
    cfg = gate_config(min_rows=len(ids) - 2)
    name = "few-rows"
    register_head(name, "concat", cfg, learned=learned_ids + ids[:3])  # the champion saw 3 test rows
    version, decision, _ = register_head(name, "concat", cfg)
    n = len(ids) - 3
    assert (version, decision.promoted, decision.n_rows, decision.test) == ("2", False, n, None)
    assert decision.reason == (f"only {n} test rows are unseen by both champion v1 and challenger v2 "
                               f"(promotion.min_rows: {len(ids) - 2}): not promoted; crossmodal promote --version 2 "
                               "--reason ... moves it by hand")
    assert promotion.current_champion(name) == "1"
    assert str(MlflowClient().get_model_version_by_alias(name, promotion.CHALLENGER).version) == "2"


def test_champion_without_learned_ids_is_never_outvoted(register_head, gate_config):
    """A champion registered without a record of its rows (as by an older release) cannot be compared soundly."""
    cfg = gate_config(min_rows=5)
    name = "older-champion"
    v1, first, _ = register_head(name, "concat", cfg, record=False)
    assert first.promoted and version_learned_ids(name, v1) is None
    _, decision, _ = register_head(name, "concat", cfg)
    assert not decision.promoted and decision.test is None
    assert decision.reason.startswith("champion v1 has no record of the rows it learned from")
    assert decision.reason.endswith("crossmodal promote --version 2 --reason ... moves it by hand")
    assert promotion.current_champion(name) == "1"


def test_a_changed_learned_ids_artifact_is_not_trusted(learned_ids, mlflow_store, tmp_path):
    """The version's digest pins its learned ids: an artifact that no longer matches counts as unknown."""
    import mlflow
    from crossmodal.registry.learned_ids import RUN_ID_TAG, log_learned_ids

    name, client = "tampered", MlflowClient()
    with mlflow.start_run() as run:
        pass
    digest = log_learned_ids(run.info.run_id, learned_ids)
    assert digest == learned_ids_digest(reversed(learned_ids))  # a set: any order, the same digest
    client.create_registered_model(name)
    # A version record is all this needs: no model is loaded.
    mv = client.create_model_version(name, (tmp_path / "model").as_uri(), run_id=run.info.run_id,
                                     tags={RUN_ID_TAG: run.info.run_id, LEARNED_IDS_TAG: digest})
    assert version_learned_ids(name, mv.version) == frozenset(learned_ids)
    log_learned_ids(run.info.run_id, learned_ids[:3])  # the run's artifact rewritten with fewer ids
    assert version_learned_ids(name, mv.version) is None
    assert read_learned_ids("0" * 32) is None  # no such run


def test_better_head_wins_on_its_interval_and_worse_loses(tiny_run, tiny_test_rows, register_head, gate_config):
    metrics = {h: m for h, m in tiny_run["metrics"]["heads"].items() if m["family"] != "traditional"}
    worst = min(metrics, key=lambda h: metrics[h]["test"]["macro_f1"])
    best = max(metrics, key=lambda h: metrics[h]["test"]["macro_f1"])
    cfg = gate_config(min_rows=5)
    name = "interval-test"
    register_head(name, worst, cfg)
    _, stronger, _ = register_head(name, best, cfg)
    assert stronger.delta == pytest.approx(metrics[best]["test"]["macro_f1"] - metrics[worst]["test"]["macro_f1"],
                                           abs=1e-6)
    assert stronger.ci_low <= stronger.delta <= stronger.ci_high
    assert stronger.promoted is (stronger.ci_low > cfg.min_improvement)
    champion = promotion.current_champion(name)
    assert champion == ("2" if stronger.promoted else "1")
    verdict = "significant, promoted" if stronger.promoted else "not significant: not promoted"
    assert stronger.reason.endswith(verdict), stronger.reason
    _, weaker, _ = register_head(name, worst, cfg)
    assert not weaker.promoted and promotion.current_champion(name) == champion
    if stronger.promoted:  # the worst head against the best: the same interval, mirrored
        assert weaker.delta == pytest.approx(-stronger.delta) and weaker.ci_high < 0
        assert weaker.reason.endswith("significantly worse: not promoted")
    gate_moves = [(e["version"], e["previous"], e["action"]) for e in read_history(name)]
    assert gate_moves == [("1", None, "gate")] + ([("2", "1", "gate")] if stronger.promoted else [])


def test_absent_images_and_texts_in_test_rows_are_gated(tiny_test_rows, register_head, gate_config):
    """A run with --allow-missing either has test rows without an image or a text: each is scored from what it has."""
    rows = tiny_test_rows().copy()
    assert len(rows) >= 6
    rows.iloc[0, rows.columns.get_loc("image")] = None
    rows.iloc[1, rows.columns.get_loc("image")] = np.nan
    rows.iloc[2, rows.columns.get_loc("text")] = None
    rows.iloc[3, rows.columns.get_loc("text")] = np.nan
    rows.iloc[4, rows.columns.get_loc("text")] = "   "
    cfg = gate_config(min_rows=5)
    name = "gappy-gate"
    _, first, _ = register_head(name, "concat", cfg, rows=rows)
    assert first.promoted and first.challenger_score is not None and first.n_rows == len(rows)
    _, second, _ = register_head(name, "concat", cfg, rows=rows)
    assert (second.test, second.n_rows, second.delta, second.promoted) == ("paired_bootstrap", len(rows), 0.0, False)

    inputs = promotion.model_input(rows)
    assert inputs["image_bytes"].iloc[0] is None and inputs["image_bytes"].iloc[1] is None
    assert inputs["text"].iloc[2:5].isna().all() and isinstance(inputs["image_bytes"].iloc[2], bytes)

    # No image in any row (a text-only chunk): the column is left out and the model predicts from the texts.
    text_only = rows.iloc[5:].assign(image=None)
    assert list(promotion.model_input(text_only).columns) == ["text"]
    labels, proba = promotion.score_version(name, "1", text_only)
    assert proba.shape == (len(text_only), len(labels)) and np.allclose(proba.sum(axis=1), 1.0)


def test_test_rows_without_ids_are_refused(tiny_test_rows, gate_config, mlflow_store):
    from crossmodal.errors import PromotionError

    with pytest.raises(PromotionError, match="no 'id' column"):  # before anything is registered
        promotion.register_and_gate("models:/m-0", "no-ids", tiny_test_rows().drop(columns=["id"]),
                                    gate_config(min_rows=5), mlflow_store)
    assert MlflowClient().search_model_versions("name = 'no-ids'") == []


def test_a_row_learned_under_another_id_is_not_unseen(tiny_test_rows):
    from crossmodal.registry.learned_ids import content_keys, learned_keys

    rows = tiny_test_rows()
    renamed = rows.assign(id=[f"new-{i}" for i in range(len(rows))])
    champion_learned = learned_keys(rows.assign(split="train").iloc[:3])  # learned 3 of them as train rows
    mask = promotion.unseen_rows(renamed, champion_learned)
    assert mask.tolist() == [False] * 3 + [True] * (len(rows) - 3)
    assert content_keys(rows).str.startswith("content:").all() and content_keys(rows).is_unique
