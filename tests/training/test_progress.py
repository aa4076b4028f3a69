"""Live progress files: one JSON line per epoch, read back whole and in order; train_all writes them per head."""

from __future__ import annotations

import json

from crossmodal.training.progress import ProgressTail, epoch_writer


def test_no_folder_no_writer():
    assert epoch_writer(None, "concat") is None


def test_tail_reads_only_new_whole_lines(tmp_path):
    write = epoch_writer(tmp_path / "progress", "concat")
    tail = ProgressTail(tmp_path / "progress")
    assert tail.poll() == []
    write({"epoch": 1, "val_macro_f1": 0.5})
    write({"epoch": 2, "val_macro_f1": float("nan")})  # not JSON: stored as null
    got = tail.poll()
    assert [(task, r["epoch"]) for task, r in got] == [("concat", 1), ("concat", 2)]
    assert got[1][1]["val_macro_f1"] is None and "time" in got[0][1]
    assert tail.poll() == []
    with open(tmp_path / "progress" / "concat.jsonl", "a") as fh:  # a writer killed mid-line
        fh.write('{"epoch": 3')
    assert tail.poll() == []
    with open(tmp_path / "progress" / "concat.jsonl", "a") as fh:
        fh.write(', "val_macro_f1": 0.7}\n')
    assert [r["epoch"] for _, r in tail.poll()] == [3]


def test_train_all_reports_every_epoch_of_every_head(tiny_run, tmp_path):
    from crossmodal.features.extract import extract_features
    from crossmodal.training.train import train_all

    cfg = tiny_run["cfg"]
    validated = tiny_run["validated_dir"] / "validated.parquet"
    feats = extract_features(validated, cfg.encoders, tmp_path / "cache", progress=False)
    train_cfg = cfg.train.model_copy(update={"heads": ["text_only", "concat"], "max_epochs": 3, "patience": 5})
    train_all(validated, feats.image_path, feats.text_path, train_cfg, tmp_path / "models",
              progress_dir=tmp_path / "progress")
    for head in ("text_only", "concat"):
        lines = [json.loads(x) for x in (tmp_path / "progress" / f"{head}.jsonl").read_text().splitlines()]
        history = json.loads((tmp_path / "models" / head / "head.json").read_text())["history"]
        assert [x["epoch"] for x in lines] == [h["epoch"] for h in history] == [1, 2, 3]
        assert [x["val_macro_f1"] for x in lines] == [h["val_macro_f1"] for h in history]
