"""The stage cache's store (crossmodal.pipeline.cache) and the keys of the cached stages (crossmodal.pipeline.stages).

An entry is trusted only when complete and unchanged: a folder killed half-way, an entry without its entry.json, a
truncated or edited file are misses. Keys change with what the stage reads, and only with that.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crossmodal import files
from crossmodal.artifacts import ENTRY_FILE
from crossmodal.pipeline import stages
from crossmodal.pipeline.cache import StageCache, tmp_name

KEY = "ab" * 32


def _outputs(folder: Path) -> Path:
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text("alpha")
    (folder / "sub" / "b.bin").write_bytes(os.urandom(2048))
    return folder


def test_store_lookup_restore_round_trip(tmp_path):
    cache = StageCache(tmp_path / "cache")
    src = _outputs(tmp_path / "run1")
    assert cache.lookup("train", KEY) is None
    entry = cache.store("train", KEY, src, {"heads": ["concat"]})
    assert entry.meta == {"heads": ["concat"]} and set(entry.files) == {"a.txt", "sub/b.bin"}
    found = cache.lookup("train", KEY)
    assert found is not None and found.meta == {"heads": ["concat"]}
    assert found.restore(tmp_path / "run2") == "hardlink"
    for rel in ("a.txt", "sub/b.bin"):
        assert (tmp_path / "run2" / rel).read_bytes() == (src / rel).read_bytes()
    assert (tmp_path / "run2" / "a.txt").stat().st_nlink == 3  # run1, the entry, run2: one file, no copy
    assert not [p for p in (tmp_path / "cache" / "stages" / "train").iterdir() if p.name.startswith(".tmp-")]
    with pytest.raises(ValueError, match="hex digest"):
        cache.lookup("train", "../escape")


def test_copy_where_hard_links_are_impossible(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    cache = StageCache(tmp_path / "cache")
    cache.store("evaluate", KEY, _outputs(tmp_path / "run1"))
    entry = cache.lookup("evaluate", KEY)
    assert entry.restore(tmp_path / "run2") == "copy"
    assert (tmp_path / "run2" / "a.txt").read_text() == "alpha" and (tmp_path / "run2" / "a.txt").stat().st_nlink == 1
    (tmp_path / "run2" / "a.txt").write_text("edited in the run folder")  # a copy: the entry is unaffected
    assert cache.lookup("evaluate", KEY) is not None


def test_half_written_and_changed_entries_are_not_trusted(tmp_path):
    cache = StageCache(tmp_path / "cache")
    src = _outputs(tmp_path / "run1")
    final = cache.entry_dir("train", KEY)

    # Killed while storing: the outputs sit in a temporary folder (its writer is gone); no lookup reads it.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    leftover = final.parent / tmp_name(KEY[:16]).replace(f"-{os.getpid()}-", f"-{int(dead.stdout)}-")
    shutil.copytree(src, leftover / "out")
    assert cache.lookup("train", KEY) is None
    # Killed between copying the outputs and writing entry.json (only possible where a folder was copied into place
    # by hand, but the rule holds): not trusted either.
    shutil.copytree(src, final / "out")
    assert cache.lookup("train", KEY) is None
    # The next store replaces the untrusted folder and sweeps the dead writer's leftover.
    cache.store("train", KEY, src)
    assert cache.lookup("train", KEY) is not None and not leftover.exists()

    entry_file = final / ENTRY_FILE
    good = entry_file.read_text()
    entry_file.write_text(good[: len(good) // 2])  # a torn entry.json
    assert cache.lookup("train", KEY) is None
    entry_file.write_text(good)
    assert cache.lookup("train", KEY) is not None
    b = final / "out" / "sub" / "b.bin"
    with open(b, "r+b") as fh:  # truncated
        fh.truncate(100)
    assert cache.lookup("train", KEY) is None
    cache.store("train", KEY, _outputs(tmp_path / "run3"))
    entry = cache.lookup("train", KEY)
    assert entry is not None
    a = final / "out" / "a.txt"  # edited in place through a run folder's hard link: same size, new mtime
    st = a.stat()
    a.write_text("ALPHA")
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert cache.lookup("train", KEY) is None
    (final / "out" / "a.txt").unlink()  # deleted
    assert cache.lookup("train", KEY) is None


def test_a_valid_entry_is_kept_unless_replaced(tmp_path):
    cache = StageCache(tmp_path / "cache")
    first = cache.store("train", KEY, _outputs(tmp_path / "run1"), {"n": 1})
    second = cache.store("train", KEY, _outputs(tmp_path / "run2"), {"n": 2})  # a concurrent run, same key
    assert first.meta == second.meta == {"n": 1}
    forced = cache.replace("train", KEY, tmp_path / "run2", {"n": 2})
    assert forced.meta == {"n": 2} and cache.lookup("train", KEY).meta == {"n": 2}
    assert (forced.out / "a.txt").stat().st_ino == (tmp_path / "run2" / "a.txt").stat().st_ino


# ----------------------------------------------------------------------------- the keys
@pytest.fixture
def small_data(tmp_path, tiny_config):
    from crossmodal.data.demo import generate_demo

    cfg = tiny_config(tmp_path, demo={"rows": 60, "image_size": 32, "bad_rows": False})
    generate_demo(tmp_path / "data", cfg.demo)
    cfg.data.manifest = str(tmp_path / "data" / "manifest.csv")
    return cfg, tmp_path / "data" / "manifest.csv"


def test_validate_key_follows_the_manifest_its_images_and_its_settings(small_data, monkeypatch):
    import pandas as pd

    cfg, manifest = small_data
    base = stages.validate_key(manifest, cfg)
    assert stages.validate_key(manifest, cfg) == base
    other = cfg.model_copy(deep=True)
    other.train.max_epochs = 3  # training settings: not validation's business
    other.encoders.image.image_size = 128
    assert stages.validate_key(manifest, other) == base
    other.validation.min_rows_per_class = 3
    assert stages.validate_key(manifest, other) != base

    image = manifest.parent / pd.read_csv(manifest)["image"].iloc[0]
    st = image.stat()
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # touched: same bytes, new mtime
    touched = stages.validate_key(manifest, cfg)
    assert touched != base
    moved = image.with_name("elsewhere.png")
    image.rename(moved)  # the row's image disappears: the key changes, validation will quarantine the row
    assert stages.validate_key(manifest, cfg) not in (base, touched)
    moved.rename(image)
    assert stages.validate_key(manifest, cfg) == touched

    text = manifest.read_text()
    manifest.write_text(text + "\n")  # the same rows, other bytes
    assert stages.validate_key(manifest, cfg) != touched
    manifest.write_text(text)
    monkeypatch.setattr(stages, "code_version", lambda: "another version of the code")
    assert stages.validate_key(manifest, cfg) != touched


def test_train_and_evaluate_keys(small_data, monkeypatch):
    cfg, _ = small_data
    feats = {"image_key": "i" * 64, "text_key": "t" * 64}
    base = stages.train_key("data", feats, cfg)
    other = cfg.model_copy(deep=True)
    other.train.finetune.resume = False  # how, not what: the same model
    other.train.finetune.checkpoint_dir = "/elsewhere"
    other.validation.max_quarantine_fraction = 0.5  # validation's setting: reaches training only through the data
    assert stages.train_key("data", feats, other) == base
    for change in ({"max_epochs": 3}, {"heads": ["concat"]}, {"seed": 1}):
        changed = cfg.model_copy(deep=True)
        for k, v in change.items():
            setattr(changed.train, k, v)
        assert stages.train_key("data", feats, changed) != base, change
    assert stages.train_key("other data", feats, cfg) != base
    assert stages.train_key("data", {**feats, "text_key": "u" * 64}, cfg) != base
    assert stages.evaluate_key(base) == stages.evaluate_key(base) != stages.evaluate_key("x" * 64)
    monkeypatch.setattr(stages, "code_version", lambda: "another version of the code")
    assert stages.train_key("data", feats, cfg) != base


def test_code_version_changes_with_any_source_file(tmp_path, monkeypatch):
    import crossmodal

    package = Path(crossmodal.__file__).parent
    copy = tmp_path / "crossmodal"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(crossmodal, "__file__", str(copy / "__init__.py"))
    files.code_version.cache_clear()
    try:
        base = files.code_version()
        (copy / "__pycache__").mkdir(exist_ok=True)
        (copy / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"compiled")  # not source
        files.code_version.cache_clear()
        assert files.code_version() == base
        (copy / "heads" / "concat.py").write_text((copy / "heads" / "concat.py").read_text() + "\n# edited\n")
        files.code_version.cache_clear()
        assert files.code_version() != base
    finally:
        files.code_version.cache_clear()


def test_forced_training_starts_fine_tuning_from_scratch_under_the_same_key(small_data, tmp_path, monkeypatch):
    """--force retrains with train.finetune.resume off (a finished checkpoint would otherwise be reused as is), and
    the forced outputs replace the entry under the key a normal run looks up."""
    import crossmodal.training.train

    cfg, _ = small_data
    seen = []

    def fake_train_all(validated_path, image_path, text_path, train_cfg, out_dir, encoders, cache_dir,
                       progress_dir=None, run_tasks=None):
        seen.append(train_cfg.finetune.resume)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "labels.json").write_text(json.dumps([len(seen)]))
        return crossmodal.training.train.TrainResult(out_dir=str(out_dir), labels=["a", "b"], heads=["concat"], rows={})

    monkeypatch.setattr(crossmodal.training.train, "train_all", fake_train_all)
    validated = {"data_hash": "d" * 64, "validated_path": "v.parquet"}
    feats = {"image_key": "i" * 64, "text_key": "t" * 64, "image_path": "i.npy", "text_path": "t.npy"}
    cache = tmp_path / "cache"
    first, rec1 = stages.cached_train(validated, feats, cfg, tmp_path / "run1", cache)
    again, rec2 = stages.cached_train(validated, feats, cfg, tmp_path / "run2", cache)
    forced, rec3 = stages.cached_train(validated, feats, cfg, tmp_path / "run3", cache, force=True)
    after, rec4 = stages.cached_train(validated, feats, cfg, tmp_path / "run4", cache)
    assert seen == [True, False]  # trained twice: cold, then forced (without resuming)
    assert [r["cached"] for r in (rec1, rec2, rec3, rec4)] == [False, True, False, True]
    assert rec1["key"] == rec3["key"] == rec4["key"]
    assert json.loads((tmp_path / "run4" / "labels.json").read_text()) == [2]  # the forced outputs
    assert cfg.train.finetune.resume is True  # the caller's settings are left alone
