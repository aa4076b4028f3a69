"""The training flow's stages with their cache: a stage runs only when its key (inputs, settings, code) is new.

Usage (what ``flows/training.py`` calls; plain functions, no orchestration inside)::

    from crossmodal.pipeline import stages
    validated, rec = stages.cached_validate(manifest, cfg, run_dir / "validated", cfg.paths.cache)
    trained, rec = stages.cached_train(validated, features, cfg, run_dir / "models", cfg.paths.cache)
    evaluated, rec = stages.cached_evaluate(trained, run_dir / "reports", cfg.paths.cache)
    rec   # {"cached": True, "key": "3f2a...", "seconds": 0.02, "files": "hardlink"}

``features`` is ``crossmodal.features.extract.extract_features(...).to_dict()``: extraction has its own
content-addressed store. Each key is a sha256 that includes the package's code version
(``crossmodal.files.code_version``); entries live in ``crossmodal.pipeline.cache``:

- **validate**: the manifest's bytes and resolved path, the settings validation reads (``validation``,
  ``data.columns``, ``data.split``, the data root, the text encoder's name and ``max_length``), and each image's
  resolved path, size, mtime_ns and inode: touching or replacing an image re-validates, and no image is read to
  decide that.
- **train**: the validated data's hash, the feature keys, the ``train`` and ``encoders`` settings; where fine-tuning
  keeps its checkpoints and whether it resumes do not change what is trained, so they are left out.
- **evaluate**: the train key (evaluation has no settings of its own).

``force=True`` recomputes the stage and replaces its entry (fine-tuning then also starts from scratch instead of
reusing a finished checkpoint). Storing is best effort: a cache that cannot be written costs a warning, not the run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from crossmodal.artifacts import DATA_DOCS_DIR, METRICS_FILE
from crossmodal.config import Config
from crossmodal.files import code_version, digest, file_sha256
from crossmodal.pipeline.cache import Entry, StageCache, sweep_tmp, tmp_name

log = logging.getLogger(__name__)

VALIDATE_PATHS = ("validated_path", "quarantine_path", "report_path", "docs_dir")  # ValidationResult's paths


def _record(cached: bool, key: str | None, t0: float, files: str | None = None) -> dict[str, Any]:
    return {"cached": cached, "key": key, "seconds": round(time.perf_counter() - t0, 4), "files": files}


def _lookup(cache: StageCache, stage: str, key: str | None, force: bool) -> Entry | None:
    if key is None or force:
        return None
    try:
        return cache.lookup(stage, key)
    except OSError as err:
        log.warning("%s: cannot read the stage cache (%s); running the stage", stage, err)
        return None


def _store(cache: StageCache, stage: str, key: str | None, src: Path, meta: dict[str, Any], force: bool) -> None:
    if key is None:
        return
    try:
        (cache.replace if force else cache.store)(stage, key, src, meta)
    except OSError as err:
        log.warning("%s: could not store its outputs in the stage cache %s (%s); the next run recomputes them",
                    stage, cache.root, err)


# ----------------------------------------------------------------------------- validate
def _image_identity(cell: object, root_real: Path) -> list | None:
    """[cell, resolved path, size, mtime_ns, inode] of one image cell, resolved as ``crossmodal.validation.rows`` does;
    [cell, path, None, errno] when it cannot be read; None for a cell validation rejects without a file."""
    if not isinstance(cell, str) or not cell.strip() or "\x00" in cell:
        return None
    try:
        cell.encode("utf-8")
    except UnicodeEncodeError:
        return None
    given = Path(cell)
    real = os.path.realpath(os.path.normpath(given if given.is_absolute() else root_real / given))
    try:
        st = os.stat(real)
    except OSError as err:
        return [cell, real, None, err.errno]
    return [cell, real, st.st_size, st.st_mtime_ns, st.st_ino]


def validate_key(manifest: str | Path, cfg: Config) -> str:
    """The validate stage's key (see the module docstring); raises what ``read_manifest`` raises."""
    from crossmodal.data.manifest import read_manifest

    manifest = Path(manifest).resolve()
    raw = read_manifest(manifest, cfg.data.columns)
    root = Path(cfg.data.data_root) if cfg.data.data_root else manifest.parent
    root_real = Path(os.path.realpath(root))
    h = hashlib.sha256(digest({
        "stage": "validate", "code": code_version(), "manifest": str(manifest), "data_root": str(root_real),
        "manifest_sha256": file_sha256(manifest), "validation": cfg.validation.model_dump(),
        "columns": cfg.data.columns.model_dump(), "split": cfg.data.split.model_dump(),
        "text_encoder": [cfg.encoders.text.name, cfg.encoders.text.max_length]}).encode())
    for cell in dict.fromkeys(raw["image"].tolist()):  # each distinct cell once, in manifest order
        ident = _image_identity(cell, root_real)
        if ident is not None:
            h.update(digest(ident).encode())
    return h.hexdigest()


def cached_validate(manifest: str | Path, cfg: Config, out_dir: str | Path, cache_dir: str | Path,
                    force: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """``validate_manifest(manifest, cfg, out_dir).to_dict()``, from the cache when its key is known.

    Returns ``(result, record)``; a cached result has the same keys, its paths in ``out_dir``.
    """
    from crossmodal.validation.validate import validate_manifest

    t0 = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    cache = StageCache(cache_dir)
    try:
        key: str | None = validate_key(manifest, cfg)
    except Exception as err:  # an unreadable manifest: validation itself says what is wrong, clearly
        log.debug("validate: no cache key (%s)", err)
        key = None
    entry = _lookup(cache, "validate", key, force)
    if entry is not None:
        files = entry.restore(out_dir)
        (out_dir / DATA_DOCS_DIR).mkdir(parents=True, exist_ok=True)
        result = dict(entry.meta["result"])
        for name in VALIDATE_PATHS:
            result[name] = str(out_dir / result[name])
        for warning in result.get("warnings") or []:  # as a computed validation logs them: on every run
            logging.getLogger("crossmodal.validation.validate").warning("%s", warning)
        return result, _record(True, key, t0, files)
    result = validate_manifest(manifest, cfg, out_dir).to_dict()
    meta = dict(result)
    for name in VALIDATE_PATHS:
        meta[name] = Path(result[name]).resolve().relative_to(out_dir).as_posix()
    _store(cache, "validate", key, out_dir, {"result": meta}, force)
    return result, _record(False, key, t0)


# ----------------------------------------------------------------------------- extract (forced)
def private_store(cache_dir: str | Path) -> Path:
    """A fresh, empty feature store beside the real one, for ``force_extract`` (its shards may fill it first)."""
    folder = Path(cache_dir).resolve() / "stages" / "extract"
    folder.mkdir(parents=True, exist_ok=True)
    sweep_tmp(folder)
    return folder / tmp_name("force")


def force_extract(validated_path: str | Path, cfg: Config, cache_dir: str | Path, progress: bool = True,
                  on_progress=None, private: str | Path | None = None) -> dict[str, Any]:
    """Encode every item again even when the feature store has it (``--force``), then swap the results in.

    They are extracted into a private, empty store next to the real one (so nothing is reused: ``encoded`` counts
    every distinct item) and moved into the real one by ``crossmodal.features.extract.replace_store``: the shelf
    chunks win over the entries they replace, the assembled arrays land on the cached ones with one atomic rename
    each, so a run reading the store meanwhile sees the old file or the new one, never a missing one.
    ``progress``, ``on_progress``: as for ``extract_features``. ``private``: a store from :func:`private_store` that
    extraction shards have filled already (it is removed here either way).
    """
    from crossmodal.features.extract import extract_features, replace_store

    cache_dir = Path(cache_dir).resolve()
    tmp = Path(private) if private is not None else private_store(cache_dir)
    try:
        result = replace_store(extract_features(validated_path, cfg.encoders, tmp, progress=progress,
                                                on_progress=on_progress), tmp, cache_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result.to_dict()


# ----------------------------------------------------------------------------- train
def train_key(data_hash: str, features: dict[str, Any], cfg: Config) -> str:
    train = cfg.train.model_dump()
    for where_not_what in ("resume", "checkpoint_dir"):
        train["finetune"].pop(where_not_what, None)
    return digest({"stage": "train", "code": code_version(), "data_hash": data_hash,
                   "features": [features["image_key"], features["text_key"]], "train": train,
                   "encoders": cfg.encoders.model_dump()})


def cached_train(validated: dict[str, Any], features: dict[str, Any], cfg: Config, out_dir: str | Path,
                 cache_dir: str | Path, force: bool = False, progress_dir: str | Path | None = None,
                 run_tasks=None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``train_all`` on the validated table and features into ``out_dir``, from the cache when the key is known.

    Returns ``({"train_dir", "heads", "key", "tasks", "processes"}, record)``; ``tasks``: where each training task ran
    and for how long (none when cached). ``progress_dir``: where the heads append their epochs while they train (a
    cached stage trains nothing, so writes nothing there). ``run_tasks``: as for ``train_all`` (default: here).
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    cache = StageCache(cache_dir)
    key = train_key(validated["data_hash"], features, cfg)
    entry = _lookup(cache, "train", key, force)
    if entry is not None:
        files = entry.restore(out_dir)
        return ({"train_dir": str(out_dir), "heads": entry.meta.get("heads"), "key": key, "tasks": [],
                 "processes": entry.meta.get("processes", {})}, _record(True, key, t0, files))
    from crossmodal.training.train import run_in_process, train_all

    train_cfg = cfg.train
    if force:  # from scratch: a finished fine-tuning checkpoint would otherwise be reused as is
        train_cfg = train_cfg.model_copy(deep=True)
        train_cfg.finetune.resume = False
    result = train_all(validated["validated_path"], features["image_path"], features["text_path"], train_cfg,
                       out_dir, cfg.encoders, str(Path(cache_dir).resolve()), progress_dir,
                       run_tasks or run_in_process)
    _store(cache, "train", key, out_dir, {"heads": result.heads, "processes": result.processes}, force)
    return ({"train_dir": str(out_dir), "heads": result.heads, "key": key, "tasks": result.tasks,
             "processes": result.processes}, _record(False, key, t0))


# ----------------------------------------------------------------------------- evaluate
def evaluate_key(train_key_: str) -> str:
    return digest({"stage": "evaluate", "code": code_version(), "train": train_key_})


def cached_evaluate(trained: dict[str, Any], out_dir: str | Path, cache_dir: str | Path,
                    force: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """``evaluate_all(trained["train_dir"], out_dir)``, from the cache when the train key is known.

    Returns ``({"reports_dir", "metrics_path", "key"}, record)``.
    """
    t0 = time.perf_counter()
    out_dir = Path(out_dir).resolve()
    cache = StageCache(cache_dir)
    key = evaluate_key(trained["key"])
    entry = _lookup(cache, "evaluate", key, force)
    out = {"reports_dir": str(out_dir), "metrics_path": str(out_dir / METRICS_FILE), "key": key}
    if entry is not None:
        return out, _record(True, key, t0, entry.restore(out_dir))
    from crossmodal.evaluation.evaluate import evaluate_all

    evaluate_all(trained["train_dir"], out_dir)
    _store(cache, "evaluate", key, out_dir, {}, force)
    return out, _record(False, key, t0)
