"""validate_manifest: each kind of bad row gets its own reason; dataset-level failures raise ValidationFailed."""

from __future__ import annotations

import hashlib
import json
import os

import pandas as pd
import pytest

from crossmodal.config import DemoConfig, from_dict
from crossmodal.data.demo import generate_demo
from crossmodal.errors import DataError, ManifestError, ValidationFailed
from crossmodal.validation.validate import validate_manifest


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory, good_rows, image_bytes, write_image, write_csv, validation_config,
             check_validation):
    """One manifest holding every kind of bad row next to good ones; validated once for the module."""
    base = tmp_path_factory.mktemp("bad")
    root = base / "data"
    rows = good_rows(root, 12)
    img = root / "images"
    write_image(base / "outside" / "secret.jpg", 99)  # a real image, but outside the data root
    os.symlink(base / "outside" / "secret.jpg", img / "link.jpg")
    (img / "notes.jpg").write_text("just some text, not an image")
    truncated = image_bytes(5, size=(64, 64), fmt="PNG")
    (img / "trunc.png").write_bytes(truncated[: len(truncated) // 2])
    (img / "zero.jpg").write_bytes(b"")
    write_image(img / "huge.png", 1, size=(120, 120), fmt="PNG")  # over max_image_pixels below
    (img / "fat.jpg").write_bytes(image_bytes(2) + b"\0" * 30_000)  # over max_image_bytes below
    write_image(img / "bird.jpg", 50)
    write_image(img / "d1.jpg", 51)
    write_image(img / "d2.jpg", 52)

    def bad(rid, image="images/ok0.jpg", text="fine text", label="cat"):
        return {"id": rid, "image": image, "text": text, "label": label}

    rows += [
        bad("missing-file", image="images/nope.jpg"),
        bad("escape", image="../../etc/passwd"),
        bad("abs-outside", image=str(base / "outside" / "secret.jpg")),
        bad("abs-inside", image=str(root / "images" / "ok1.jpg")),  # allowed: absolute but inside the root
        bad("symlink-out", image="images/link.jpg"),
        bad("not-image", image="images/notes.jpg"),
        bad("truncated", image="images/trunc.png"),
        bad("zero-bytes", image="images/zero.jpg"),
        bad("too-many-pixels", image="images/huge.png"),
        bad("too-many-bytes", image="images/fat.jpg"),
        bad("no-image-path", image=None),
        bad("empty-text", text=None),
        bad("space-text", text="  \t  "),
        bad("invisible-text", text="\u200b\u200d"),
        bad("long-text", text="x" * 300),
        bad("bad-utf8", text="caf\udce9 au lait"),  # written as the raw byte 0xE9
        bad("no-label", label=None),
        bad("blank-label", label="   "),
        bad("lonely-bird", image="images/bird.jpg", label="bird"),
        bad("dup", image="images/d1.jpg"),
        bad("dup", image="images/d2.jpg"),
        bad(None, image="images/ok2.jpg"),
    ]
    manifest = write_csv(root / "manifest.csv", rows, ["id", "image", "text", "label"])
    out = base / "out"
    cfg = validation_config(max_text_chars=200, max_image_pixels=100 * 100, max_image_bytes=20_000)
    res = validate_manifest(manifest, cfg, out)
    q, v, report = check_validation(res, out)
    return {"res": res, "q": q, "v": v, "report": report, "root": root, "out": out}


EXPECTED = {
    "missing-file": "image file not found: 'images/nope.jpg'",
    "escape": "image path '../../etc/passwd' resolves to ",
    "abs-outside": "outside the data root",
    "symlink-out": "resolves through a symlink to",
    "not-image": "not a decodable image",
    "truncated": "image is truncated or corrupt",
    "zero-bytes": "is empty (0 bytes)",
    "too-many-pixels": "image has 120 x 120 pixels, over the limit 10000",
    "too-many-bytes": "over the limit 20000 (validation.max_image_bytes)",
    "no-image-path": "image path is missing",
    "empty-text": "text is missing",
    "space-text": "text is empty",
    "invisible-text": "text is empty",
    "long-text": "text is too long (300 characters, maximum 200",
    "bad-utf8": "text is not valid UTF-8 (undecodable byte 0xE9 at character 3)",
    "no-label": "label is missing",
    "blank-label": "label is missing",
    "lonely-bird": "class 'bird' has only 1 valid row(s), fewer than validation.min_rows_per_class=2",
}


@pytest.mark.parametrize("rid", sorted(EXPECTED))
def test_bad_row_reason(bad_data, rid):
    q = bad_data["q"]
    reasons = q.loc[q["id"] == rid, "reason"].tolist()
    assert len(reasons) == 1, (rid, reasons)
    assert EXPECTED[rid] in reasons[0]
    if rid in ("escape", "abs-outside", "symlink-out"):
        assert "outside the data root" in reasons[0]
    assert rid not in set(bad_data["v"]["id"])


def test_duplicate_ids_keep_the_first(bad_data):
    q, v = bad_data["q"], bad_data["v"]
    dup = q[q["id"] == "dup"]
    assert len(dup) == 1 and dup["image"].item() == "images/d2.jpg"
    assert dup["reason"].item().startswith("duplicate id 'dup' (first at row ")
    assert v.loc[v["id"] == "dup", "image"].item().endswith("d1.jpg")
    unique = next(e for e in bad_data["report"]["expectations"] if e["expectation"] == "expect_column_values_to_be_unique")
    assert not unique["success"] and unique["failing_ids"] == ["dup", "dup"]


def test_missing_id_quarantined(bad_data):
    q = bad_data["q"]
    assert q.loc[q["id"] == "", "reason"].tolist() == ["id is missing"]


def test_good_rows_kept_in_canonical_form(bad_data):
    v, root = bad_data["v"], bad_data["root"]
    assert set(v["id"]) == {f"ok{k}" for k in range(12)} | {"abs-inside", "dup"}
    row = v[v["id"] == "ok3"].iloc[0]
    assert row["image"] == str((root / "images" / "ok3.jpg").resolve())
    assert row["image_sha256"] == hashlib.sha256((root / "images" / "ok3.jpg").read_bytes()).hexdigest()
    assert row["text"] == "a picture number 3" and row["label"] == "dog" and row["_row"] == 3
    assert v["_row"].is_monotonic_increasing  # manifest order
    assert bad_data["res"].labels == ["cat", "dog"]


def test_report_and_data_docs(bad_data):
    res, report = bad_data["res"], bad_data["report"]
    assert (res.docs_dir / "index.html").is_file()
    assert report["success"] and report["quarantine_reasons"]["text empty"] == 2
    not_null_label = next(e for e in report["expectations"]
                          if e["expectation"] == "expect_column_values_to_not_be_null" and e["kwargs"]["column"] == "label")
    assert set(not_null_label["failing_ids"]) == {"no-label", "blank-label"}
    json.dumps(res.to_dict())  # JSON-able
    assert len(res.data_hash) == 64


def test_quarantine_keeps_raw_bytes_readable(bad_data):
    q = bad_data["q"]
    assert q.loc[q["id"] == "bad-utf8", "text"].item() == "caf\\udce9 au lait"


def test_deterministic_hash(tmp_path, good_rows, write_csv, validation_config, check_validation):
    root = tmp_path / "d"
    manifest = write_csv(root / "m.csv", good_rows(root, 10))
    a = validate_manifest(manifest, validation_config(), tmp_path / "a")
    b = validate_manifest(manifest, validation_config(), tmp_path / "b")
    assert a.data_hash == b.data_hash
    check_validation(a, tmp_path / "a")


def test_manifest_errors_are_validation_failures(tmp_path, validation_config):
    with pytest.raises(ManifestError, match="does not exist") as e:
        validate_manifest(tmp_path / "missing.csv", validation_config(), tmp_path / "out")
    assert isinstance(e.value, ValidationFailed) and isinstance(e.value, DataError)
    p = tmp_path / "m.csv"
    p.write_text("image,caption,label\na.jpg,x,y\n")
    with pytest.raises(ValidationFailed, match="lacks required column"):
        validate_manifest(p, validation_config(), tmp_path / "out")


def test_quarantine_fraction_limit(tmp_path, good_rows, write_csv, validation_config):
    root = tmp_path / "d"
    rows = good_rows(root, 6) + [{"id": f"gone{k}", "image": f"images/gone{k}.jpg", "text": "t", "label": "cat"}
                                 for k in range(3)]
    manifest = write_csv(root / "m.csv", rows)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "validated.parquet").write_text("stale")
    with pytest.raises(ValidationFailed) as e:
        validate_manifest(manifest, validation_config(max_quarantine_fraction=0.2), out)
    msg = str(e.value)
    assert "3 of 9 rows (33.3%) were quarantined" in msg and "quarantine.csv" in msg
    assert "image file not found: 3" in msg  # the top reasons
    q = pd.read_csv(out / "quarantine.csv")
    assert len(q) == 3
    assert not (out / "validated.parquet").exists()  # no stale table left for the next stage
    assert json.loads((out / "validation.json").read_text())["success"] is False


def test_fewer_than_two_classes(tmp_path, good_rows, write_csv, validation_config):
    root = tmp_path / "d"
    manifest = write_csv(root / "m.csv", good_rows(root, 6, labels=("cat",)))
    with pytest.raises(ValidationFailed, match=r"only 1 class\(es\) left"):
        validate_manifest(manifest, validation_config(), tmp_path / "out")


def test_allowed_labels(tmp_path, good_rows, write_csv, validation_config):
    root = tmp_path / "d"
    rows = good_rows(root, 6) + good_rows(root, 2, labels=("cow",), start=6)
    res = validate_manifest(write_csv(root / "m.csv", rows), validation_config(labels=["cat", "dog"]),
                            tmp_path / "out")
    q = pd.read_csv(res.quarantine_path)
    assert q["reason"].str.startswith("label 'cow' is not one of ['cat', 'dog']").all() and len(q) == 2


def test_split_column_values(tmp_path, good_rows, write_jsonl, validation_config, check_validation):
    root = tmp_path / "d"
    rows = good_rows(root, 10)
    for r, s in zip(rows, ["TRAIN", "train", "Valid", "validation", "test", "Test", "train", "train", "bogus", None]):
        r["split"] = s
    res = validate_manifest(write_jsonl(root / "m.jsonl", rows), validation_config(), tmp_path / "out")
    q, v, report = check_validation(res, tmp_path / "out")
    assert dict(zip(q["id"], q["reason"])) == {
        "ok8": "split value 'bogus' is not one of train/val/test (also accepted: valid, validation, dev)",
        "ok9": "split is missing"}
    assert v["split"].tolist() == ["train", "train", "val", "val", "test", "test", "train", "train"]
    assert report["split_source"] == "manifest"


def test_group_straddling_given_splits_fails(tmp_path, good_rows, write_csv, validation_config):
    root = tmp_path / "d"
    rows = good_rows(root, 8)
    for k, r in enumerate(rows):
        r["split"], r["group"] = ("train" if k < 6 else "test"), ("shared" if k in (0, 7) else f"g{k}")
    with pytest.raises(ValidationFailed, match=r"group\(s\) appear in more than one split.*'shared'"):
        validate_manifest(write_csv(root / "m.csv", rows), validation_config(), tmp_path / "out")


def test_assigned_splits_respect_groups_and_warn_on_cross_split_duplicates(tmp_path, good_rows, write_csv,
                                                                            validation_config, check_validation):
    root = tmp_path / "d"
    rows = good_rows(root, 200)  # 50 groups: the repeated caption's 20 groups cannot all hash to one split
    for k, r in enumerate(rows):
        r["group"] = f"g{k // 4}"
        r["text"] = "the same caption everywhere" if k % 10 == 0 else r["text"]
    res = validate_manifest(write_csv(root / "m.csv", rows), validation_config(), tmp_path / "out")
    _, v, report = check_validation(res, tmp_path / "out")
    assert (v.groupby("group")["split"].nunique() == 1).all()
    assert report["split_source"].startswith("assigned")
    assert any("identical texts appear in more than one split" in w for w in res.warnings)


def test_demo_bad_rows_are_exactly_the_quarantine(tmp_path, check_validation):
    manifest = generate_demo(tmp_path / "demo", DemoConfig(rows=60, seed=3, image_size=32))
    res = validate_manifest(manifest, from_dict({}), tmp_path / "out")
    q, v, _ = check_validation(res, tmp_path / "out")
    assert res.rows_in == 66 and res.rows_kept == 60
    assert sorted(q["id"]) == sorted(["bad-missing-image", "bad-truncated-jpeg", "bad-empty-file", "bad-not-an-image",
                                      "bad-empty-caption", "bad-missing-label"])
    assert res.labels == ["neutral", "sarcastic", "sincere"]
