"""Read a manifest (CSV, JSON Lines or Parquet) into the canonical row table that validation checks.

Values are kept raw (nothing stripped or cleaned) so that validation can say exactly what is wrong with a row.

Usage::

    from crossmodal.config import Columns
    from crossmodal.data.manifest import read_manifest
    df = read_manifest("data/demo/manifest.csv", Columns())          # or Columns(text="caption")

The result always has the columns ``_row, id, image, text, label, split, group`` (``_row``: the 0-based row
number in the file; ``split``/``group``: None without such a column; ``id``: ``"row-<_row>"`` without one).
Missing cells are None; other values are ``str`` (a numeric label 1 is "1"). Bytes that are not valid UTF-8 stay
as lone surrogates (``surrogateescape``) and a JSON list or object where one value belongs is kept as a
:class:`Structured` string, so one bad cell quarantines its row, not the file. A CSV's separator (comma,
semicolon, tab or pipe) is read from its header line. Unreadable files raise :class:`DataError`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from crossmodal.config import Columns
from crossmodal.errors import DataError

CANONICAL = ["_row", "id", "image", "text", "label", "split", "group"]
REQUIRED_ROLES = ("image", "text", "label")
OPTIONAL_ROLES = ("id", "split", "group")
_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


def _is_missing(v: Any) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    return isinstance(v, float) and math.isnan(v)


def is_absent(value) -> bool:
    """A cell that holds no input: None, NaN, empty bytes, or a string with nothing but whitespace. The one test the
    served models, fine-tuning and the traditional baselines share (validation's row checks also look at what
    ``clean_text`` leaves of a text)."""
    return value is None or (isinstance(value, float) and value != value) or (
        isinstance(value, bytes | bytearray) and len(value) == 0) or (isinstance(value, str) and not value.strip())


class Structured(str):
    """A JSON list or object found where one value belongs; kept as its JSON text so validation can quarantine it."""

    structured: str = "JSON value"


def _structured(v: list | tuple | dict) -> Structured:
    out = Structured(json.dumps(v, ensure_ascii=False, default=str))
    out.structured = "JSON object" if isinstance(v, dict) else "JSON list"
    return out


def _as_text(v: Any) -> str | None:
    """Raw value -> str (None stays None). Bytes (Parquet binary columns) decode like the CSV reader."""
    if isinstance(v, (list, tuple, dict)):
        return _structured(v)
    if hasattr(v, "tolist") and not isinstance(v, str):  # a numpy array from a Parquet list column
        v = v.tolist()
        if isinstance(v, list):
            return _structured(v)
    if _is_missing(v):
        return None
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode("utf-8", errors="surrogateescape")
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # a label column read as float (1.0 because of a missing cell) means "1"
    return v if isinstance(v, str) else str(v)


_DELIMITERS = (",", ";", "\t", "|")


def sniff_delimiter(path: Path) -> str:
    """The field separator of a CSV file, from its header line: the one that splits it into most fields.

    European spreadsheets save "CSV" with semicolons, some exports use tabs; a comma wins ties. Separators inside
    double quotes do not count.
    """
    with open(path, "rb") as fh:
        line = fh.readline(1 << 16).decode("utf-8", errors="replace").removeprefix("\ufeff")
    unquoted = "".join(part for k, part in enumerate(line.split('"')) if k % 2 == 0)
    counts = {d: unquoted.count(d) for d in _DELIMITERS}
    best = max(_DELIMITERS, key=lambda d: (counts[d], d == ","))
    return best if counts[best] else ","


def _read_csv(path: Path) -> pd.DataFrame:
    sep = sniff_delimiter(path)
    try:
        # utf-8-sig drops a byte-order mark (Excel writes one); surrogateescape keeps invalid
        # bytes as lone surrogates so one bad cell quarantines one row instead of the file.
        # Only an empty cell is missing: the strings "NA" or "null" may well be real labels.
        frame = pd.read_csv(path, sep=sep, encoding="utf-8-sig", encoding_errors="surrogateescape", dtype=object,
                            keep_default_na=False, na_values=[""])
        frame.attrs["delimiter"] = sep
        return frame
    except pd.errors.EmptyDataError:
        raise DataError(f"manifest {path} is empty: it has no header and no rows") from None
    except pd.errors.ParserError as err:
        raise DataError(f"manifest {path} is not valid CSV: {err}. Check quoting and the number of "
                        "fields on that line.") from None


def _read_jsonl(path: Path) -> pd.DataFrame:
    records: list[dict[str, Any]] = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            line = raw.decode("utf-8", errors="surrogateescape")
            if lineno == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue  # blank lines (often a trailing newline) carry no row
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"manifest {path}, line {lineno}: not valid JSON ({err.msg} at column "
                                f"{err.colno}). Each line must hold one JSON object.") from None
            if not isinstance(obj, dict):
                raise DataError(f"manifest {path}, line {lineno}: expected a JSON object "
                                f"{{\"image\": ..., \"text\": ..., \"label\": ...}}, got {type(obj).__name__}")
            records.append(obj)
    return pd.DataFrame.from_records(records) if records else pd.DataFrame()


def _read_parquet(path: Path) -> pd.DataFrame:
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises several types (ArrowInvalid, OSError) for a bad file
        raise DataError(f"manifest {path} is not a readable Parquet file: {err}") from None
    # to_pylist keeps Python objects (no string-dtype conversion that could mangle bytes).
    return pd.DataFrame({name: pd.Series(table.column(name).to_pylist(), dtype=object)
                         for name in table.column_names})


def manifest_columns(path: str | Path) -> list[str]:
    """The column names of an existing manifest file, read cheaply: a CSV's header line, a Parquet file's schema,
    the keys of a JSON Lines file's objects (every line is parsed, but no frame is built).

    Raises :class:`DataError` for an unsupported extension or a file that cannot be read as its format.
    """
    path = Path(path)
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"manifest {path} has an unsupported extension {path.suffix!r}; "
                        f"use one of {sorted(_SUFFIXES)}")
    if kind == "csv":
        with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as fh:
            header = next(csv.reader(fh, delimiter=sniff_delimiter(path)), None)
        if not header:
            raise DataError(f"manifest {path} is empty: it has no header and no rows")
        return header
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        except Exception as err:  # pyarrow raises several types (ArrowInvalid, OSError) for a bad file
            raise DataError(f"manifest {path} is not a readable Parquet file: {err}") from None
    keys: dict[str, None] = {}
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if raw.strip():
                try:
                    obj = json.loads(raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff"))
                except json.JSONDecodeError as err:
                    raise DataError(f"manifest {path}, line {lineno}: not valid JSON ({err.msg} at column "
                                    f"{err.colno}). Each line must hold one JSON object.") from None
                if isinstance(obj, dict):
                    keys.update(dict.fromkeys(str(k) for k in obj))
    return list(keys)


def read_manifest(path: str | Path, columns: Columns | None = None) -> pd.DataFrame:
    """Read ``path`` and return the canonical frame (see the module docstring)."""
    columns = columns or Columns()
    path = Path(path)
    if not path.exists():
        raise DataError(f"manifest {path} does not exist. Check data.manifest in params.yaml "
                        "(or run `crossmodal demo` to generate the demo dataset).")
    if path.is_dir():
        raise DataError(f"manifest {path} is a directory; point data.manifest at a .csv, .jsonl or .parquet file")
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"manifest {path} has an unsupported extension {path.suffix!r}; "
                        f"use one of {sorted(_SUFFIXES)}")
    raw = {"csv": _read_csv, "jsonl": _read_jsonl, "parquet": _read_parquet}[kind](path)
    if len(raw) == 0:
        raise DataError(f"manifest {path} is empty: it has no data rows")

    available = [str(c) for c in raw.columns]
    mapping = columns.model_dump()
    defaults = Columns().model_dump()
    missing = [f"{role} (column {mapping[role]!r})" for role in REQUIRED_ROLES if mapping[role] not in available]
    if missing:
        raise DataError(f"manifest {path} lacks required column(s) {', '.join(missing)}. Available columns: "
                        f"{available}. Rename them in the file or map them in data.columns of params.yaml.")
    # An optional column left at its default name may be absent; one the user mapped explicitly
    # to another name must exist, otherwise the mapping is a typo that would be silently ignored.
    unknown = [f"{role} -> {mapping[role]!r}" for role in OPTIONAL_ROLES
               if mapping[role] != defaults[role] and mapping[role] not in available]
    if unknown:
        raise DataError(f"manifest {path}: data.columns maps {', '.join(unknown)}, but no such column exists. "
                        f"Available columns: {available}.")

    n = len(raw)
    out = pd.DataFrame({"_row": pd.Series(range(n), dtype="int64")})
    for role in ("id", "image", "text", "label", "split", "group"):
        name = mapping[role]
        if name in available and kind == "csv":
            # The CSV reader gives only str or NaN: a vectorised NaN -> None is enough (fast on a million rows).
            col = raw[name].astype(object)
            out[role] = col.where(col.notna(), None).reset_index(drop=True)
        elif name in available:
            out[role] = pd.Series([_as_text(v) for v in raw[name].tolist()], dtype=object)
        elif role == "id":
            out[role] = pd.Series([f"row-{i}" for i in range(n)], dtype=object)
        else:
            out[role] = pd.Series([None] * n, dtype=object)
    out.attrs["source"] = {"path": str(path), "format": kind, "delimiter": raw.attrs.get("delimiter"),
                           "columns": available,
                           "has_split": mapping["split"] in available, "has_group": mapping["group"] in available,
                           "has_id": mapping["id"] in available}
    return out[CANONICAL]
