"""The validated table: the rows validation kept, in the form every later stage reads.

    from crossmodal.data.validated import read_validated
    df = read_validated("work/validated/validated.parquet", required=("id", "label", "split"))

Columns (``VALIDATED_COLUMNS``): ``id, image, text, label, split, group, image_sha256`` as strings (an absent image
or text is null; ``image`` is the resolved path) and ``_row``, the row's number in the manifest. Validation writes
it; this is its one reader, so each stage's error for a missing or foreign table says the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from crossmodal.errors import DataError, UserError

VALIDATED_COLUMNS = ["id", "image", "text", "label", "split", "group", "image_sha256", "_row"]


def read_validated(path: str | Path, required: Sequence[str] = ("id", "label", "split"),
                   error: type[UserError] = DataError):
    """The table at ``path`` as a DataFrame; ``error`` (naming the file and what to run) when it is absent,
    unreadable or lacks a ``required`` column."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise error(f"{path} not found; run `crossmodal validate` first")
    try:
        df = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a file that is not parquet
        raise error(f"{path} is not a readable parquet file ({err}); re-run `crossmodal validate`") from None
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise error(f"{path} lacks column(s) {missing}; it must come from `crossmodal validate`")
    return df
