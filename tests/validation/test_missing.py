"""Missing modalities in validation: absent images or texts are kept or quarantined as validation.allow_missing
says, and the CLI option reaches the config. (The same concept in the other stages: test_missing.py of
tests/features, tests/heads, tests/training, tests/evaluation, tests/serving and tests/e2e.)"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from crossmodal.validation.validate import validate_manifest

NO_IMAGE, NO_TEXT = {"no-image", "blank-image"}, {"no-text", "blank-text"}


@pytest.mark.parametrize("allow, kept_extra", [
    ("none", set()), ("image", NO_IMAGE), ("text", NO_TEXT), ("either", NO_IMAGE | NO_TEXT)])
def test_validation_keeps_absent_modalities_only_when_allowed(gappy_manifest, tmp_path, allow, kept_extra,
                                                              validation_config):
    cfg = validation_config(allow_missing=allow)
    res = validate_manifest(gappy_manifest, cfg, tmp_path)
    assert res.rows_in == 17 == res.rows_kept + res.rows_quarantined
    kept = pd.read_parquet(res.validated_path)
    assert set(kept["id"]) == {f"ok{k}" for k in range(12)} | kept_extra
    q = pd.read_csv(tmp_path / "quarantine.csv", dtype=str, keep_default_na=False).set_index("id")
    assert len(q) == res.rows_quarantined and set(q.index) | set(kept["id"]) == set(
        pd.read_csv(gappy_manifest)["id"])
    # A row with neither modality is never kept, and says why.
    assert q.loc["neither", "reason"].startswith("no image and no text")
    for rid in (NO_IMAGE | NO_TEXT) - kept_extra:
        assert rid in q.index and q.loc[rid, "reason"]
    # Absent means null in the validated table: no path, no hash, no text.
    for rid in kept_extra & NO_IMAGE:
        row = kept.set_index("id").loc[rid]
        assert pd.isna(row["image"]) and pd.isna(row["image_sha256"]) and row["text"]
    for rid in kept_extra & NO_TEXT:
        row = kept.set_index("id").loc[rid]
        assert pd.isna(row["text"]) and row["image_sha256"]
    report = json.loads(res.report_path.read_text())
    assert report["allow_missing"] == allow
    assert report["rows_missing_image"] == len(kept_extra & NO_IMAGE)
    assert report["rows_missing_text"] == len(kept_extra & NO_TEXT)


def test_cli_options_reach_the_config(gappy_manifest, tmp_path):
    from typer.testing import CliRunner

    from crossmodal.cli import app

    runner = CliRunner()
    base = ["validate", "--manifest", str(gappy_manifest), "--params", str(tmp_path / "none.yaml")]
    bad = runner.invoke(app, [*base, "--out", str(tmp_path / "a"), "--allow-missing", "sometimes"])
    assert bad.exit_code == 2 and "validation.allow_missing" in bad.output and "Traceback" not in bad.output
    ok = runner.invoke(app, [*base, "--out", str(tmp_path / "b"), "--allow-missing", "either"])
    assert ok.exit_code == 0, ok.output
    assert "17 in = 16 kept + 1 quarantined" in ok.output
