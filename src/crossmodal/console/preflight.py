"""Checks of a command's inputs made before any server starts or heavy library loads: the manifest is there and
readable, the columns the settings map are in it, the data root is a folder.

    from crossmodal.console.preflight import RUN_OPTIONS, check_inputs
    check_inputs(cfg, options=RUN_OPTIONS)      # raises DataError: manifest /x.csv not found (--manifest or data.manifest)

A failure is one :class:`~crossmodal.errors.DataError` line that names the value, the command-line option that set
it and its key in ``params.yaml``, so the user knows which of the two to fix; a run that would fail at validation
this way fails here in a fraction of a second instead of after the Prefect API has started. Only the header is
read (``crossmodal.data.manifest.manifest_columns``); the rows are validation's business.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from crossmodal.config import Columns, Config
from crossmodal.data.manifest import OPTIONAL_ROLES, REQUIRED_ROLES, manifest_columns
from crossmodal.errors import DataError

COLUMN_OPTIONS = {"image": "--image-column", "text": "--text-column", "label": "--label-column",
                  "id": "--id-column", "split": "--split-column", "group": "--group-column"}
RUN_OPTIONS = {"manifest": "--manifest", "data_root": "--data-root", **COLUMN_OPTIONS}
MAX_LISTED = 12  # columns named in a message; a wide manifest's others are counted


def _where(option: str | None, key: str | None) -> str:
    named = [n for n in (option, key) if n]
    return f" ({' or '.join(named)})" if named else ""


def _listing(columns: Sequence[str]) -> str:
    shown = ", ".join(columns[:MAX_LISTED]) or "none"
    return shown + (f" and {len(columns) - MAX_LISTED} more" if len(columns) > MAX_LISTED else "")


def check_manifest(path: str | Path, where: str = "") -> list[str]:
    """The columns of the manifest at ``path``; a DataError ending in ``where`` when it is absent or unreadable."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"manifest {path} not found{where}")
    if path.is_dir():
        raise DataError(f"manifest {path} is a folder, not a .csv, .jsonl or .parquet file{where}")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
        return manifest_columns(path)
    except OSError as err:
        raise DataError(f"manifest {path} cannot be read: {err.strerror or err}{where}") from None
    except DataError as err:
        raise DataError(f"{err}{where}") from None


def check_columns(path: str | Path, available: Sequence[str], columns: Columns,
                  required: Sequence[str] = REQUIRED_ROLES, options: Mapping[str, str] = COLUMN_OPTIONS) -> None:
    """Every ``required`` role's column, and every optional one mapped away from its default name, is in
    ``available``; otherwise one DataError naming each missing column, its option and its params key."""
    mapping, defaults = columns.model_dump(), Columns().model_dump()
    roles = [*required, *(r for r in (*REQUIRED_ROLES, *OPTIONAL_ROLES)
                          if r not in required and mapping[r] != defaults[r])]
    missing = [(mapping[r], _where(options.get(r), f"data.columns.{r}")) for r in roles if mapping[r] not in available]
    if not missing:
        return
    name, listing = Path(path).name, _listing(list(available))
    if len(missing) == 1:
        column, where = missing[0]
        raise DataError(f"column {column!r} not in {name}{where}; columns: {listing}")
    named = ", ".join(f"{column!r}{where}" for column, where in missing)
    raise DataError(f"columns {named} not in {name}; columns: {listing}")


def check_inputs(cfg: Config, manifest: str | Path | None = None, options: Mapping[str, str] = RUN_OPTIONS,
                 required: Sequence[str] = REQUIRED_ROLES) -> None:
    """Check ``manifest`` (default: ``cfg.data.manifest``), its mapped columns and the data root.

    ``options`` maps ``manifest``, ``data_root`` and each column role to the command's option for it (absent:
    the command has none). An explicit ``manifest`` is the command's own (``predict --manifest``), not a setting.
    """
    key = "data.manifest" if manifest is None else None
    path = Path(manifest if manifest is not None else cfg.data.manifest)
    available = check_manifest(path, _where(options.get("manifest"), key))
    check_columns(path, available, cfg.data.columns, required, options)
    if cfg.data.data_root and not Path(cfg.data.data_root).is_dir():
        raise DataError(f"data root {cfg.data.data_root} is not a folder"
                        f"{_where(options.get('data_root'), 'data.data_root')}")
