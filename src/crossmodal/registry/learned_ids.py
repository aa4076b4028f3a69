"""The rows a registered model learned from: its run's train and validation ids, kept with the run, so that a later
gate can compare two models only on rows neither of them saw.

    from crossmodal.registry.learned_ids import log_learned_ids, version_learned_ids
    digest = log_learned_ids(run_id, frame.loc[frame["split"].isin(["train", "val"]), "id"])
    version_learned_ids("crossmodal-fusion", "3")   # frozenset of ids, or None when the version cannot prove them

The ids (and each row's content key, :func:`content_keys`, so a row learned under another id is recognised too) go
to the run as the artifact ``data/learned_ids.parquet`` (one string column ``id``, sorted, unique) and
their sha256 (:func:`learned_ids_digest`) as the tag ``crossmodal.learned_ids_sha256`` on the run and, set by the
gate, on the registered version. A version is traced to its run by its tag ``crossmodal.run_id``. A version whose
run holds no such artifact (registered by an older release, or without a run), or whose artifact does not match the
version's digest, has learned from rows nobody can name: :func:`version_learned_ids` returns None for it.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from crossmodal.artifacts import LEARNED_IDS_FILE

LEARNED_IDS_TAG = "crossmodal.learned_ids_sha256"
RUN_ID_TAG = "crossmodal.run_id"  # on a registered version: the pipeline run that logged it
ARTIFACT_DIR = "data"  # the run's artifact folder for what it was trained and tested on
LEARNED_IDS_ARTIFACT = f"{ARTIFACT_DIR}/{LEARNED_IDS_FILE}"


CONTENT_PREFIX = "content:"


def content_keys(frame: pd.DataFrame) -> pd.Series:
    """Per row, ``content:<sha256 of image bytes' sha256, NUL, text>``: what the row is, whatever its id.

    Learned alongside the ids, so that a test row is unseen only when neither its id nor its content was learned:
    the same image and text under a new id (a re-export, a manifest without ids whose ``row-<n>`` ids moved) is
    still recognised. Rows of a frame without ``image_sha256`` and ``text`` columns get no key (an empty Series).
    """
    if not {"image_sha256", "text"} <= set(frame.columns):
        return pd.Series([], dtype=object)
    return pd.Series([CONTENT_PREFIX + hashlib.sha256(f"{sha or ''}\x00{text or ''}".encode("utf-8", "surrogatepass"))
                      .hexdigest() for sha, text in zip(frame["image_sha256"].tolist(), frame["text"].tolist(),
                                                        strict=True)], index=frame.index, dtype=object)


def learned_keys(frame: pd.DataFrame) -> list[str]:
    """What a model trained on ``frame`` learned from: the ids and content keys of its train and val rows."""
    seen = frame[frame["split"].isin(["train", "val"])]
    return [*seen["id"].astype(str).tolist(), *content_keys(seen).tolist()]


def normalise_ids(ids: Iterable) -> list[str]:
    """Sorted unique ids as strings; null ids are dropped (validation gives every kept row one)."""
    return sorted({str(i) for i in ids if i is not None and not (isinstance(i, float) and i != i)})


def learned_ids_digest(ids: Iterable) -> str:
    """sha256 of the sorted unique ids, one per line: the same set of ids gives the same digest, in any order."""
    h = hashlib.sha256()
    for i in normalise_ids(ids):
        h.update(i.encode("utf-8", "surrogatepass") + b"\n")
    return h.hexdigest()


def log_learned_ids(run_id: str, ids: Iterable) -> str:
    """Log ``ids`` as ``data/learned_ids.parquet`` of run ``run_id``, tag the run with their digest; return it."""
    from mlflow.tracking import MlflowClient

    values = normalise_ids(ids)
    digest = learned_ids_digest(values)
    client = MlflowClient()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / LEARNED_IDS_FILE
        pd.DataFrame({"id": pd.Series(values, dtype="string")}).to_parquet(path, index=False)
        client.log_artifact(run_id, str(path), ARTIFACT_DIR)
    client.set_tag(run_id, LEARNED_IDS_TAG, digest)
    return digest


def read_learned_ids(run_id: str) -> frozenset[str] | None:
    """The ids run ``run_id`` learned from, or None when it has no learned-ids artifact (or the run is gone)."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        client.get_run(run_id)
        listed = {a.path for a in client.list_artifacts(run_id, ARTIFACT_DIR)}
    except MlflowException:  # a deleted or unknown run: nothing it learned from can be proved
        return None
    if LEARNED_IDS_ARTIFACT not in listed:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        local = client.download_artifacts(run_id, LEARNED_IDS_ARTIFACT, tmp)
        frame = pd.read_parquet(local)
    return frozenset(str(i) for i in frame["id"].dropna())


def version_learned_ids(model_name: str, version: str) -> frozenset[str] | None:
    """The ids a registered version learned from, read from its run; None when they cannot be proved: no run, no
    artifact, or an artifact whose digest differs from the version's ``crossmodal.learned_ids_sha256`` tag."""
    from mlflow.tracking import MlflowClient

    mv = MlflowClient().get_model_version(model_name, version)
    tags = mv.tags or {}
    run_id = tags.get(RUN_ID_TAG) or mv.run_id
    if not run_id:
        return None
    ids = read_learned_ids(run_id)
    if ids is None:
        return None
    expected = tags.get(LEARNED_IDS_TAG)
    if expected and learned_ids_digest(ids) != expected:
        return None
    return ids
