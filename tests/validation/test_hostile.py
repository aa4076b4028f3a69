"""The hostile-input corpus (hostile.py, next to this file) through the real validation stage: each case ends as
expected, and no row is ever lost (rows in = kept + quarantined).

The million-row manifest is a slow test (and benchmarks/validate.py); a 20,000-row one runs by default.
"""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import pytest
from typer.testing import CliRunner

from crossmodal.data.images import load_image
from crossmodal.data.manifest import read_manifest
from crossmodal.validation.validate import validate_manifest
from tests.validation import hostile
from tests.validation.hostile import CLEAN_TEXT, EXPECTED_PIXELS, ROW_CASES


@pytest.fixture(scope="module")
def ordinary_rows(good_rows):
    """``ordinary_rows(root, n)``: the good rows a hostile manifest sits next to (ids good0, good1, ...)."""
    return functools.partial(good_rows, prefix="good", caption="an ordinary caption number {k}")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, ordinary_rows, validation_config, check_validation):
    base = tmp_path_factory.mktemp("hostile")
    manifest = hostile.write_row_corpus(base / "data", ordinary_rows(base / "data", 16))
    res = validate_manifest(manifest, validation_config(), base / "out")
    q, v, _ = check_validation(res, base / "out")
    return {"res": res, "q": q, "v": v, "root": base / "data", "manifest": manifest, "base": base}


@pytest.mark.parametrize("case", ROW_CASES, ids=lambda c: c.name)
def test_row_case_outcome(corpus, case):
    q, v = corpus["q"], corpus["v"]
    ids = [str(r["id"]) for r in case.rows]
    if case.expect == "kept":
        assert set(ids) <= set(v["id"]), (case.name, q[q["id"].isin(ids)]["reason"].tolist())
    else:
        reasons = q.loc[q["id"].isin(ids), "reason"].tolist()
        assert len(reasons) == len(ids), (case.name, reasons)
        assert all(case.reason in r for r in reasons), (case.name, reasons)


def test_corpus_counts(corpus):
    res = corpus["res"]
    expected_q = sum(len(c.rows) for c in ROW_CASES if c.expect == "quarantined")
    assert res.rows_in == 16 + sum(len(c.rows) for c in ROW_CASES)
    assert res.rows_quarantined == expected_q and res.rows_kept == res.rows_in - expected_q
    report = json.loads(res.report_path.read_text())
    assert report["quarantine_reasons"]["image format unsupported"] == 2  # svg + heic, their own kind
    assert report["quarantine_reasons"]["image file holds text"] == 1


@pytest.mark.parametrize("name", sorted(EXPECTED_PIXELS))
def test_kept_images_decode_to_the_right_rgb(corpus, name):
    """The validated path is decoded with the very load_image the feature extractor uses."""
    v = corpus["v"]
    path = v.loc[v["id"] == name, "image"].item()
    img = load_image(path)
    assert img.mode == "RGB"
    if name == "exif-rotated":
        assert img.size == (20, 40)  # stored 40 x 20 with orientation 6: turned upright
    for xy, colour in EXPECTED_PIXELS[name]:
        got = img.getpixel(xy)
        assert max(abs(a - b) for a, b in zip(got, colour)) <= 8, (name, xy, got, colour)


@pytest.mark.parametrize("name", sorted(CLEAN_TEXT))
def test_kept_texts_are_cleaned_not_mangled(corpus, name):
    v = corpus["v"]
    assert v.loc[v["id"] == name, "text"].item() == CLEAN_TEXT[name]


def test_bomb_refused_before_decoding(tmp_path):
    """A 10,000 x 10,000 PNG of a few hundred bytes: refused by its declared size, in milliseconds, no big alloc."""
    import time
    import tracemalloc

    from crossmodal.data.images import ImageError

    data = hostile.png_bomb(10_000, 10_000)
    assert len(data) < 1000
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match="over the limit 1000000"):
        load_image(data, max_pixels=1_000_000)
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 10_000_000, peak  # decoding would need 100 MB
    assert elapsed < 1.0


def test_megabyte_text_kept_when_allowed_and_truncation_warned_once(tmp_path, caplog, ordinary_rows,
                                                                     validation_config, check_validation):
    root = tmp_path / "data"
    rows = ordinary_rows(root, 12)
    for k in (0, 1, 2):
        rows[k]["text"] = hostile.MEGABYTE_TEXT if k == 0 else "word " * 60  # 3 texts over 32 tokens
    manifest = root / "m.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with caplog.at_level(logging.WARNING, logger="crossmodal.validation.validate"):
        res = validate_manifest(manifest, validation_config(max_text_chars=2_000_000), tmp_path / "out")
    q, v, _ = check_validation(res, tmp_path / "out")
    assert res.rows_kept == 12 and len(v.loc[v["id"] == "good0", "text"].item()) > 999_000
    warned = [w for w in res.warnings if "longer than encoders.text.max_length=32 tokens" in w]
    assert len(warned) == 1 and warned[0].startswith("3 text(s)")  # one warning with a count, not one per row
    assert sum("longer than encoders.text.max_length" in r.message for r in caplog.records) == 1


def test_megabyte_text_is_truncated_by_the_tokenizer():
    """The features path accepts the 1 MB caption: the tokenizer keeps max_length tokens."""
    from crossmodal.config import EncodersConfig
    from crossmodal.features.extractor import FeatureExtractor

    ext = FeatureExtractor(EncodersConfig.model_validate({"text": {"max_length": 32}}))
    feats = ext.embed_texts([hostile.MEGABYTE_TEXT, hostile.MEGABYTE_TEXT[:200]])
    assert feats.shape[0] == 2 and np.isfinite(feats).all()
    np.testing.assert_allclose(feats[0], feats[1], atol=1e-5)  # both cut to the same first 32 tokens


def test_exif_rotation_applied_in_the_features_path():
    """preprocess.load_image is shared: the extractor sees the rotated photo upright, exactly like validation."""
    import io

    from PIL import Image

    from crossmodal.config import EncodersConfig
    from crossmodal.features.extractor import FeatureExtractor

    stored, _ = hostile.exif_rotated_jpeg()
    with Image.open(io.BytesIO(stored)) as raw:
        pixels = raw.convert("RGB")  # the same decoded pixels, EXIF ignored: sideways
    upright = pixels.transpose(Image.Transpose.ROTATE_270)  # what orientation 6 asks for
    assert upright.size == (20, 40)
    ext = FeatureExtractor(EncodersConfig.model_validate({"image": {"image_size": 64}}))
    feats = ext.embed_images([stored, hostile.encode(upright, "PNG"), hostile.encode(pixels, "PNG")])
    same = float(np.dot(feats[0], feats[1]) / np.linalg.norm(feats[0]) / np.linalg.norm(feats[1]))
    sideways = float(np.dot(feats[0], feats[2]) / np.linalg.norm(feats[0]) / np.linalg.norm(feats[2]))
    assert same > 0.999 and sideways < 0.95, (same, sideways)


@pytest.mark.parametrize("how,classes,warned", [
    ("strip", ["CAT", "Cat", "cat", "dog"], True),
    ("none", ["CAT", "Cat", "cat", "dog"], True),
    ("strip_lower", ["cat", "dog"], False),
])
def test_labels_differing_by_case_or_spaces(tmp_path, how, classes, warned, ordinary_rows, validation_config,
                                            check_validation):
    manifest = hostile.write_labels_by_case(tmp_path / "data", ordinary_rows(tmp_path / "data", 12))
    res = validate_manifest(manifest, validation_config(normalize_labels=how, min_rows_per_class=1), tmp_path / "out")
    check_validation(res, tmp_path / "out")
    if how == "none":
        classes = [" CAT", "Cat ", "cat", "dog"]
    assert res.labels == classes
    report = json.loads(res.report_path.read_text())
    assert report["label_variants"][0]["spellings"] == [" CAT", "Cat ", "cat"]
    assert any("differ only by case or spaces" in w and "strip_lower" in w for w in res.warnings) is warned


def test_numeric_and_mixed_type_labels(tmp_path, ordinary_rows, validation_config, check_validation):
    manifest = hostile.write_numeric_and_mixed(tmp_path / "data", ordinary_rows(tmp_path / "data", 12))
    res = validate_manifest(manifest, validation_config(), tmp_path / "out")
    q, v, _ = check_validation(res, tmp_path / "out")
    assert res.labels == ["0", "1"] and res.rows_kept == 12  # 1, 1.0 and "1" are one class
    assert "12345" in set(v["id"]) and v.loc[v["_row"] == 5, "text"].item() == "42"


@pytest.mark.parametrize("sep,bom", [(",", True), (";", False), (";", True), ("\t", False), ("|", False)])
def test_delimiters_and_bom(tmp_path, sep, bom, ordinary_rows, validation_config, check_validation):
    manifest = hostile.write_delimited(tmp_path / "data", ordinary_rows(tmp_path / "data", 10), sep, bom)
    df = read_manifest(manifest)
    assert df.attrs["source"]["delimiter"] == sep
    assert df["text"].iloc[0] == f"quoted{sep} with the separator inside"
    res = validate_manifest(manifest, validation_config(), tmp_path / "out")
    check_validation(res, tmp_path / "out")
    assert res.rows_kept == 10 and res.labels == ["cat", "dog"]


def test_nul_byte_in_a_csv_caption_is_stripped(tmp_path, ordinary_rows, validation_config, check_validation):
    manifest = hostile.write_csv_with_nul(tmp_path / "data", ordinary_rows(tmp_path / "data", 10))
    res = validate_manifest(manifest, validation_config(), tmp_path / "out")
    _, v, _ = check_validation(res, tmp_path / "out")
    assert res.rows_kept == 10 and v.loc[v["id"] == "good0", "text"].item() == "an ordinary caption number 0"


def test_many_rows_sharing_images_decode_each_file_once(tmp_path, monkeypatch, validation_config,
                                                        check_validation):
    """20,000 rows over 50 files: each file is decoded once, and nothing is lost."""
    from crossmodal.validation import rows as rowchecks

    calls = []
    real = rowchecks.decode_image
    monkeypatch.setattr(rowchecks, "decode_image", lambda path, cfg: calls.append(path) or real(path, cfg))
    manifest = hostile.write_many_rows(tmp_path / "data", 20_000, distinct_images=50, bad_every=1000)
    res = validate_manifest(manifest, validation_config(), tmp_path / "out")
    q, v, _ = check_validation(res, tmp_path / "out")
    assert res.rows_in == 20_000 and res.rows_quarantined == 20 and len(calls) == 50
    assert q["reason"].str.startswith("image file not found").all()


@pytest.mark.slow
def test_million_rows(tmp_path, validation_config, check_validation):
    import time

    manifest = hostile.write_many_rows(tmp_path / "data", 1_000_000, distinct_images=200, bad_every=1000)
    t0 = time.perf_counter()
    res = validate_manifest(manifest, validation_config(), tmp_path / "out")
    seconds = time.perf_counter() - t0
    check_validation(res, tmp_path / "out")
    assert res.rows_in == 1_000_000 and res.rows_quarantined == 1000 and res.rows_kept == 999_000
    print(f"validated 1,000,000 rows in {seconds:.1f} s")


def test_cli_validate_on_the_corpus(corpus, tmp_path):
    from crossmodal.cli import app

    params = tmp_path / "params.yaml"
    params.write_text("validation:\n  max_quarantine_fraction: 0.9\nencoders:\n  text: {max_length: 32}\n")
    result = CliRunner().invoke(app, ["validate", "--manifest", str(corpus["manifest"]), "--out",
                                      str(tmp_path / "o"), "--params", str(params)])
    res = corpus["res"]
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    assert f"rows: {res.rows_in} in = {res.rows_kept} kept + {res.rows_quarantined} quarantined" in result.output
    report = json.loads((tmp_path / "o" / "validation.json").read_text())
    assert (report["rows_in"], report["rows_kept"], report["rows_quarantined"]) == (
        res.rows_in, res.rows_kept, res.rows_quarantined)
