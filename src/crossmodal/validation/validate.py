"""Validate a manifest: keep the good rows, quarantine the bad ones with a reason, fail loudly when needed.

The first pipeline stage: every later stage reads the table written here, and every row read is either kept or
quarantined with one reason (the first check it fails; of duplicate ids the first is kept), never lost.

Usage::

    from crossmodal.config import load_config
    from crossmodal.validation.validate import validate_manifest
    result = validate_manifest("data/demo/manifest.csv", load_config(), "work/validated")
    print(result.rows_kept, result.rows_quarantined, result.validated_path)

Rows are checked per file and cell (``crossmodal.validation.rows``), by the Great Expectations suite
(``crossmodal.validation.expectations``) and for classes under ``min_rows_per_class`` rows; a split is assigned
when the manifest has none (``crossmodal.data.split.assign_splits``). An unreadable manifest raises
:class:`ManifestError` (both a ``ValidationFailed`` and a ``DataError``); :class:`ValidationFailed` is raised when
more than ``max_quarantine_fraction`` of the rows are quarantined, fewer than 2 classes remain, or a manifest group
straddles splits (failing rather than dropping rows, which would silently change the user's split).

Outputs in ``out_dir``: ``validated.parquet`` (``crossmodal.data.validated``; written only on success),
``quarantine.csv`` (always, header even when empty), ``validation.json`` (counts, each expectation with its
failing ids, warnings such as identical images across splits) and ``data_docs/index.html`` (GX Data Docs). The
quarantine file and the report are written before any ``ValidationFailed`` is raised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from crossmodal.artifacts import DATA_DOCS_DIR, QUARANTINE_FILE, VALIDATED_FILE, VALIDATION_FILE
from crossmodal.config import Config
from crossmodal.data.manifest import read_manifest
from crossmodal.data.split import SPLIT_SCHEME, SPLITS, assign_splits, normalize_split
from crossmodal.data.text import clean_text
from crossmodal.data.validated import VALIDATED_COLUMNS
from crossmodal.errors import DataError, EncoderUnavailable, ManifestError, ValidationFailed
from crossmodal.files import atomic_path, write_json
from crossmodal.validation.expectations import gx_reason, run_gx_suite
from crossmodal.validation.rows import Reason, check_rows

log = logging.getLogger(__name__)

QUARANTINE_COLUMNS = ["_row", "id", "image", "text", "label", "split", "group", "reason"]


@dataclass
class ValidationResult:
    validated_path: Path
    quarantine_path: Path
    report_path: Path
    docs_dir: Path
    rows_in: int
    rows_kept: int
    rows_quarantined: int
    labels: list[str]
    data_hash: str
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def _safe(s: Any) -> Any:
    """Lone surrogates -> U+FFFD, so GX and its HTML renderer never meet unencodable strings."""
    if not isinstance(s, str) or s.isascii():  # ASCII holds no surrogates
        return s
    return s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _safe_list(col: pd.Series) -> list:
    return [_safe(v) for v in col.tolist()]


def _map_distinct(col: pd.Series, fn) -> list:
    """``fn`` applied to each distinct non-missing value once (labels and splits repeat), None kept as None."""
    memo: dict[Any, Any] = {}
    out = []
    for v in col.tolist():
        if v is None:
            out.append(None)
            continue
        if v not in memo:
            memo[v] = fn(v)
        out.append(memo[v])
    return out


def normalize_label(label: str | None, how: str = "strip") -> str | None:
    """A label as compared and stored (see ``validation.normalize_labels``); a blank label is None (missing)."""
    if label is None or not label.strip():
        return None
    if how == "none":
        return label
    if how == "strip_lower":
        return " ".join(label.split()).lower()
    return label.strip()


def label_variants(labels: pd.Series, how: str) -> list[dict[str, Any]]:
    """Spellings of one label that differ only by case or whitespace, and the classes they end up as."""
    groups: dict[str, set[str]] = {}
    for lab in pd.unique(labels.dropna()):
        if isinstance(lab, str) and lab.strip():
            groups.setdefault(" ".join(lab.split()).lower(), set()).add(_safe(lab))
    return [{"spellings": sorted(spellings), "classes": sorted({normalize_label(s, how) for s in spellings})}
            for _, spellings in sorted(groups.items()) if len(spellings) > 1]


def _truncation_warning(texts: list[str], cfg: Config) -> str | None:
    """One warning (with a count) for the texts the text encoder's tokenizer will cut, instead of silence."""
    from crossmodal.encoders.registry import canonical_name
    from crossmodal.encoders.text import count_truncated
    tcfg = cfg.encoders.text
    try:
        n, longest = count_truncated(canonical_name(tcfg.name), texts, tcfg.max_length)
    except EncoderUnavailable as err:
        log.warning("cannot count texts longer than the tokenizer limit: %s", err)
        return None
    if not n:
        return None
    return (f"{n} text(s) are longer than encoders.text.max_length={tcfg.max_length} tokens (longest: {longest} "
            "tokens); the tokenizer keeps only their first tokens")


# ----------------------------------------------------------------------------- outputs
def _write_quarantine(raw: pd.DataFrame, reasons: list[Reason | None], path: Path) -> pd.DataFrame:
    idx = [i for i, r in enumerate(reasons) if r is not None]
    q = raw.iloc[idx][QUARANTINE_COLUMNS[:-1]].copy()
    q["reason"] = [reasons[i][1] for i in idx]
    with atomic_path(path) as tmp:
        # Raw bytes that were not UTF-8 are written back as \udcXX escapes: readable, and the file stays UTF-8.
        q.to_csv(tmp, index=False, encoding="utf-8", errors="backslashreplace")
    return q


def _write_validated(kept: pd.DataFrame, path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(c, pa.int64() if c == "_row" else pa.string()) for c in VALIDATED_COLUMNS])
    # Absent images/texts (validation.allow_missing) are nulls; pandas may hold them as NaN in a str column.
    columns = {c: [None if pd.isna(v) else v for v in kept[c].tolist()] for c in VALIDATED_COLUMNS}
    table = pa.Table.from_pydict(columns, schema=schema)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _data_hash(kept: pd.DataFrame) -> str:
    h = hashlib.sha256()
    for row in kept[["id", "image_sha256", "text", "label", "split"]].itertuples(index=False):
        h.update(json.dumps(list(row), ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


def _cross_split_warnings(kept: pd.DataFrame) -> list[str]:
    warnings = []
    for col, what in (("image_sha256", "identical image files"), ("text", "identical texts")):
        spans = kept.groupby(col)["split"].nunique()
        shared = spans[spans > 1]
        if len(shared):
            rows = kept[kept[col].isin(shared.index)]
            examples = rows.groupby(col)["id"].apply(lambda s: list(s)[:3]).head(3).tolist()
            warnings.append(f"{len(shared)} {what} appear in more than one split ({len(rows)} rows), "
                            f"e.g. ids {examples}: near-leakage between train and evaluation")
    return warnings


# ----------------------------------------------------------------------------- the stage
def validate_manifest(manifest_path: str | Path, cfg: Config, out_dir: str | Path) -> ValidationResult:
    """Validate ``manifest_path``; write the outputs into ``out_dir`` (see the module docstring)."""
    t0 = time.perf_counter()
    vcfg = cfg.validation
    manifest_path, out_dir = Path(manifest_path), Path(out_dir).resolve()  # GX docs need an absolute path
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {k: out_dir / n for k, n in (("validated", VALIDATED_FILE), ("quarantine", QUARANTINE_FILE),
                                         ("report", VALIDATION_FILE), ("docs", DATA_DOCS_DIR))}
    paths["validated"].unlink(missing_ok=True)  # never leave a previous run's table next to this run's report
    try:
        raw = read_manifest(manifest_path, cfg.data.columns)
    except DataError as err:
        raise ManifestError(str(err)) from None
    root = Path(cfg.data.data_root) if cfg.data.data_root else manifest_path.parent
    if not root.is_dir():
        raise ManifestError(f"data root {root} is not a directory; set data.data_root to the folder that holds "
                            "the images (relative image paths are resolved against it)")
    n = len(raw)
    raw = raw.reset_index(drop=True)  # position == _row from here on

    checks = check_rows(raw, root, vcfg)
    reasons: list[Reason | None] = list(checks.reasons)
    frame = pd.DataFrame({
        "_row": raw["_row"].astype("int64"), "id": _safe_list(raw["id"]),
        # Absent images/texts that validation.allow_missing keeps are nulls from here on.
        "image": [None if gone else v for v, gone in zip(_safe_list(raw["image"]), checks.missing_image)],
        "text": [None if gone else v for v, gone in
                 zip(_map_distinct(raw["text"], lambda t: clean_text(_safe(t))), checks.missing_text)],
        "label": _map_distinct(raw["label"], lambda lab: normalize_label(_safe(lab), vcfg.normalize_labels)),
        "split": [_safe(normalize_split(s)) for s in raw["split"].tolist()],
        "group": _safe_list(raw["group"])}).astype({c: object for c in ("id", "image", "text", "label", "split", "group")})
    has_split = frame["split"].notna().any()
    if raw.attrs.get("source", {}).get("has_split") and not has_split:
        log.warning("the split column of %s is empty in every row; assigning splits instead", manifest_path)

    expectations = run_gx_suite(frame, vcfg, bool(has_split), paths["docs"])
    if any(not e["success"] for e in expectations if e["expectation"] == "expect_column_to_exist"):
        raise ValidationFailed(f"{manifest_path}: the canonical columns are incomplete: {expectations}")
    first_row: dict[str, int] = {}
    for i, rid in enumerate(frame["id"]):
        first_row.setdefault(rid, i)
    for exp in expectations:
        for row in exp["rows"]:
            if reasons[row] is None:
                reasons[row] = gx_reason(exp, row, frame, raw, first_row, vcfg)

    # Dataset level: classes too small to learn from or to split. (Plain lists: per-row pandas indexing is slow
    # on a large manifest.)
    label_list = frame["label"].tolist()
    counts = Counter(lab for lab, r in zip(label_list, reasons) if r is None)
    small = {lab: c for lab, c in counts.items() if c < vcfg.min_rows_per_class}
    if small:
        for i, lab in enumerate(label_list):
            if reasons[i] is None and lab in small:
                reasons[i] = ("class too small", f"class {lab!r} has only {small[lab]} valid row(s), fewer than "
                              f"validation.min_rows_per_class={vcfg.min_rows_per_class}")

    keep = [i for i in range(n) if reasons[i] is None]
    kept = frame.iloc[keep].copy()
    kept["image"] = [checks.paths[i] for i in keep]
    kept["image_sha256"] = [checks.sha256[i] for i in keep]
    if not has_split and len(kept):
        units = kept
        if not raw.attrs.get("source", {}).get("has_id", True):
            # "row-<n>" ids follow the row's position: an ungrouped row is split by its content instead (image
            # bytes and text), so inserting or reordering rows moves no row between splits.
            units = kept.assign(id=[f"{sha or ''}\x00{text or ''}" for sha, text in
                                    zip(kept["image_sha256"].tolist(), kept["text"].tolist(), strict=True)])
        kept["split"] = assign_splits(units, cfg.data.split)
    labels = sorted(kept["label"].unique().tolist())
    n_q = n - len(kept)
    assert n == len(kept) + n_q == len(kept) + sum(r is not None for r in reasons)

    quarantine = _write_quarantine(raw, reasons, paths["quarantine"])
    kinds = Counter(r[0] for r in reasons if r is not None)
    warnings = _cross_split_warnings(kept) if len(kept) else []
    variants = label_variants(raw["label"], vcfg.normalize_labels)
    for v in variants:
        if len(v["classes"]) > 1:
            warnings.append(f"labels {v['spellings']} differ only by case or spaces and are {len(v['classes'])} "
                            f"separate classes {v['classes']}; set validation.normalize_labels: strip_lower to "
                            "merge them, or fix the manifest")
    truncated = _truncation_warning([t for t in kept["text"].tolist() if isinstance(t, str)], cfg)
    if truncated:
        warnings.append(truncated)
    for lab in labels:
        if not (kept["label"].eq(lab) & kept["split"].eq("train")).any():
            # An assigned split is a hash per group, exact only in expectation: a class of a few groups can miss.
            warnings.append(f"class {lab!r} has no train rows in the manifest's split" if has_split else
                            f"class {lab!r} has no train rows in the assigned split (a few groups, all hashed to "
                            "val or test); add rows of it, or give the manifest a split column")
    for s in SPLITS:
        if len(kept) and not kept["split"].eq(s).any():
            warnings.append(f"split {s!r} has no rows")

    errors: list[str] = []
    frac = n_q / n
    if frac > vcfg.max_quarantine_fraction:
        top = "; ".join(f"{k}: {c}" for k, c in kinds.most_common(5))
        errors.append(f"{n_q} of {n} rows ({frac:.1%}) were quarantined, over validation.max_quarantine_fraction="
                      f"{vcfg.max_quarantine_fraction:.0%}; see {paths['quarantine']}. Top reasons: {top}")
    if len(labels) < 2:
        errors.append(f"only {len(labels)} class(es) left after validation ({labels}); a classifier needs at "
                      f"least 2. See {paths['quarantine']}")
    if has_split and kept["group"].notna().any():
        spans = kept.dropna(subset=["group"]).groupby("group")["split"].nunique()
        straddling = sorted(spans[spans > 1].index.tolist())
        if straddling:
            errors.append(f"{len(straddling)} group(s) appear in more than one split of the manifest, e.g. "
                          f"{straddling[:5]}: rows of one group must share a split (fix the split column, or drop "
                          "it and let crossmodal assign a grouped split)")

    data_hash = _data_hash(kept) if not errors else ""
    split_counts = {s: {lab: int(c) for lab, c in kept[kept["split"] == s]["label"].value_counts().sort_index().items()}
                    for s in SPLITS}
    report = {
        "success": not errors, "errors": errors, "manifest": str(manifest_path), "data_root": str(root.resolve()),
        "format": raw.attrs.get("source", {}).get("format"), "rows_in": n, "rows_kept": len(kept),
        "rows_quarantined": n_q, "quarantine_fraction": round(frac, 6), "allow_missing": vcfg.allow_missing,
        "rows_missing_image": int(kept["image"].isna().sum()), "rows_missing_text": int(kept["text"].isna().sum()),
        "max_quarantine_fraction": vcfg.max_quarantine_fraction, "labels": labels,
        "split_source": "manifest" if has_split else f"assigned ({SPLIT_SCHEME}, seed {cfg.data.split.seed})",
        "split_counts": split_counts, "quarantine_reasons": dict(kinds.most_common()), "data_hash": data_hash,
        "normalize_labels": vcfg.normalize_labels, "label_variants": variants,
        "expectations": [{"expectation": e["expectation"], "kwargs": e["kwargs"], "success": e["success"],
                          "unexpected_count": len(e["rows"]), "failing_rows": e["rows"][:100],
                          "failing_ids": [frame.at[r, "id"] for r in e["rows"][:100]], "error": e["error"]}
                         for e in expectations],
        "warnings": warnings, "seconds": round(time.perf_counter() - t0, 3)}
    write_json(paths["report"], report, default=str)
    log.info("validated %s: %d rows in, %d kept, %d quarantined (%s)", manifest_path, n, len(kept), n_q,
             dict(kinds.most_common(3)))
    for w in warnings:
        log.warning("%s", w)
    if errors:
        raise ValidationFailed("; ".join(errors))

    _write_validated(kept, paths["validated"])
    assert len(quarantine) == n_q
    return ValidationResult(validated_path=paths["validated"], quarantine_path=paths["quarantine"],
                            report_path=paths["report"], docs_dir=paths["docs"], rows_in=n, rows_kept=len(kept),
                            rows_quarantined=n_q, labels=labels, data_hash=data_hash, warnings=warnings)
