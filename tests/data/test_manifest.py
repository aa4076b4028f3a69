"""read_manifest: formats, column mapping, raw values, and every way a manifest can be unusable."""

from __future__ import annotations

import pandas as pd
import pytest

from crossmodal.config import Columns
from crossmodal.data.manifest import CANONICAL, read_manifest
from crossmodal.errors import DataError

ROWS = [
    {"id": "a", "image": "images/a.jpg", "text": "hello world", "label": "cat", "group": "g1"},
    {"id": "b", "image": "images/b.jpg", "text": "  spaced  ", "label": "dog", "group": None},
    {"id": "c", "image": "images/c.jpg", "text": "caf\u00e9 \u2603", "label": "cat", "group": "g1"},
]


def test_csv_jsonl_parquet_read_the_same(tmp_path, write_csv, write_jsonl, write_parquet):
    frames = [read_manifest(write_csv(tmp_path / "m.csv", ROWS), Columns()),
              read_manifest(write_jsonl(tmp_path / "m.jsonl", ROWS), Columns()),
              read_manifest(write_parquet(tmp_path / "m.parquet", ROWS), Columns())]
    for df in frames:
        assert list(df.columns) == CANONICAL
        assert df["_row"].tolist() == [0, 1, 2]
        assert df["text"].tolist() == ["hello world", "  spaced  ", "caf\u00e9 \u2603"]  # raw: nothing stripped
        assert df["group"].tolist() == ["g1", None, "g1"]
        assert df["split"].tolist() == [None, None, None]
    pd.testing.assert_frame_equal(frames[0], frames[1])
    pd.testing.assert_frame_equal(frames[0], frames[2])


def test_column_mapping(tmp_path, write_jsonl):
    rows = [{"uid": 7, "img": "x.jpg", "caption": "a cat", "y": 1, "fold": "train", "poster": "p"}]
    cols = Columns(id="uid", image="img", text="caption", label="y", split="fold", group="poster")
    df = read_manifest(write_jsonl(tmp_path / "m.jsonl", rows), cols)
    rec = df.iloc[0].to_dict()
    assert rec == {"_row": 0, "id": "7", "image": "x.jpg", "text": "a cat", "label": "1", "split": "train",
                   "group": "p"}


def test_no_id_column_gives_row_ids_and_labels_become_strings(tmp_path, write_jsonl):
    rows = [{"image": "a.jpg", "text": "t", "label": 3}, {"image": "b.jpg", "text": "t", "label": None},
            {"image": "c.jpg", "text": "t", "label": 1.5}]
    df = read_manifest(write_jsonl(tmp_path / "m.jsonl", rows), Columns())
    assert df["id"].tolist() == ["row-0", "row-1", "row-2"]
    assert df["label"].tolist() == ["3", None, "1.5"]


def test_csv_keeps_na_strings_and_missing_cells(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("image,text,label\na.jpg,NA,null\nb.jpg,,\n", encoding="utf-8")
    df = read_manifest(p, Columns())
    assert df["text"].tolist() == ["NA", None]
    assert df["label"].tolist() == ["null", None]


def test_bom_csv(tmp_path):
    p = tmp_path / "m.csv"
    p.write_bytes("\ufeffimage,text,label\na.jpg,hi,cat\n".encode())
    assert read_manifest(p, Columns())["image"].tolist() == ["a.jpg"]


def test_invalid_utf8_kept_as_surrogates(tmp_path):
    p = tmp_path / "m.csv"
    p.write_bytes(b"image,text,label\na.jpg,caf\xe9,cat\nb.jpg,fine,dog\n")
    df = read_manifest(p, Columns())
    assert df["text"].tolist() == ["caf\udce9", "fine"]  # one bad cell does not sink the file


def test_parquet_bytes_are_decoded(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "m.parquet"
    pq.write_table(pa.table({"image": pa.array([b"a.jpg"], pa.binary()), "text": pa.array([b"caf\xc3\xa9 \xff"]),
                             "label": ["x"]}), p)
    df = read_manifest(p, Columns())
    assert df["image"].tolist() == ["a.jpg"]
    assert df["text"].tolist() == ["caf\u00e9 \udcff"]


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(tmp_path / "nope.csv", Columns())


@pytest.mark.parametrize("name,content,match", [
    ("zero.csv", "", "empty: it has no header"),
    ("header.csv", "image,text,label\n", "empty: it has no data rows"),
    ("blank.jsonl", "\n\n", "empty: it has no data rows"),
])
def test_empty_manifest(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_text(content)
    with pytest.raises(DataError, match=match):
        read_manifest(p, Columns())


def test_missing_required_column_lists_available(tmp_path, write_csv):
    p = write_csv(tmp_path / "m.csv", [{"image": "a.jpg", "caption": "x", "label": "cat"}])
    with pytest.raises(DataError, match=r"lacks required column\(s\) text \(column 'text'\).*'caption'") as e:
        read_manifest(p, Columns())
    assert "data.columns" in str(e.value)  # says how to fix it


def test_unknown_column_mapping(tmp_path, write_csv):
    p = write_csv(tmp_path / "m.csv", ROWS)
    with pytest.raises(DataError, match=r"maps group -> 'poster', but no such column"):
        read_manifest(p, Columns(group="poster"))
    # optional columns left at their default names may simply be absent
    df = read_manifest(write_csv(tmp_path / "n.csv", [{"image": "a", "text": "b", "label": "c"}]), Columns())
    assert df["split"].isna().all() and df["group"].isna().all()


@pytest.mark.parametrize("name, content, match", [
    ("m.jsonl", b'{"image": "a.jpg", "text": "t", "label": "x"}\n{"image": "b.jpg", "text": \n',
     "line 2: not valid JSON"),
    ("m.jsonl", b'["a.jpg", "t", "x"]\n', "line 1: expected a JSON object"),
    ("m.xlsx", b"x", "unsupported extension"),
    ("m.parquet", b"not parquet at all", "not a readable Parquet file"),
    ("m.csv", b'image,text,label\na.jpg,"unclosed quote,cat\n', "not valid CSV"),
])
def test_unreadable_manifest_names_the_problem(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError, match=match):
        read_manifest(p, Columns())
