"""The Great Expectations suite of validation: built from the settings, run on the manifest frame, read back.

    from crossmodal.validation.expectations import run_gx_suite, gx_reason
    results = run_gx_suite(frame, cfg.validation, has_split=True, docs_dir=Path("work/validated/data_docs"))
    reason = gx_reason(results[0], row, frame, raw, first_row, cfg.validation)   # (kind, message) or None

Used by ``crossmodal.validation.validate.validate_manifest``. GX 1.x runs in an ephemeral (in-memory) context,
so nothing but the Data Docs under ``docs_dir`` is written.
"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pandas as pd

from crossmodal.config import ValidationConfig
from crossmodal.data.split import SPLITS
from crossmodal.validation.rows import Reason

log = logging.getLogger(__name__)


def _suite_spec(vcfg: ValidationConfig, has_split: bool) -> list[tuple[str, dict[str, Any]]]:
    """The expectations as (GX class name, kwargs); the order is the order of precedence of reasons."""
    spec: list[tuple[str, dict[str, Any]]] = [("ExpectColumnToExist", {"column": c})
                                              for c in ("_row", "id", "image", "text", "label")]
    # An absent image or text is a null cell; allowed by validation.allow_missing, it is not a failure.
    nullable = {"image": ("image", "either"), "text": ("text", "either")}
    spec += [("ExpectColumnValuesToNotBeNull", {"column": c}) for c in ("id", "image", "text", "label")
             if vcfg.allow_missing not in nullable.get(c, ())]
    spec.append(("ExpectColumnValuesToBeUnique", {"column": "id"}))
    spec.append(("ExpectColumnValueLengthsToBeBetween",
                 {"column": "text", "min_value": vcfg.min_text_chars, "max_value": vcfg.max_text_chars}))
    if vcfg.labels:
        spec.append(("ExpectColumnValuesToBeInSet", {"column": "label", "value_set": sorted(vcfg.labels)}))
    if has_split:
        spec.append(("ExpectColumnValuesToNotBeNull", {"column": "split"}))
        spec.append(("ExpectColumnValuesToBeInSet", {"column": "split", "value_set": list(SPLITS)}))
    return spec


def run_gx_suite(frame: pd.DataFrame, vcfg: ValidationConfig, has_split: bool, docs_dir: Path) -> list[dict]:
    """Run the suite on ``frame`` (needs an int ``_row`` column); build Data Docs into ``docs_dir``.

    Returns one dict per expectation: type, kwargs, success, failing ``rows`` (``_row`` values).
    """
    logging.getLogger("great_expectations").setLevel(logging.WARNING)  # its INFO lines are internal chatter
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    shutil.rmtree(docs_dir, ignore_errors=True)  # an old run's pages would otherwise linger in the index
    # Ephemeral (in-memory) context whose only Data Docs site is docs_dir: no gx/ project folder,
    # no temporary docs site left behind in /tmp, no progress bars, no analytics.
    ctx = gx.get_context(mode="ephemeral", project_config=DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={"crossmodal": {
            "class_name": "SiteBuilder", "show_how_to_buttons": False,
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir)},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}}},
        progress_bars=ProgressBarsConfig(globally=False), analytics_enabled=False))
    batch_def = (ctx.data_sources.add_or_update_pandas("manifest").add_dataframe_asset("rows")
                 .add_batch_definition_whole_dataframe("all"))
    suite = ctx.suites.add(gx.ExpectationSuite(name="crossmodal_manifest"))
    for name, kwargs in _suite_spec(vcfg, has_split):
        suite.add_expectation(getattr(gxe, name)(**kwargs))
    vdef = ctx.validation_definitions.add(gx.ValidationDefinition(name="manifest", data=batch_def, suite=suite))
    checkpoint = ctx.checkpoints.add(gx.Checkpoint(
        name="crossmodal_manifest", validation_definitions=[vdef],
        actions=[gx.checkpoint.UpdateDataDocsAction(name="data_docs", site_names=["crossmodal"])],
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": ["_row"]}))
    run = checkpoint.run(batch_parameters={"dataframe": frame})
    out = []
    for vres in run.run_results.values():
        for r in vres.results:
            cfg = r.expectation_config
            kwargs = {k: v for k, v in cfg.kwargs.items() if k != "batch_id"}
            rows = [int(d["_row"]) for d in (r.result or {}).get("unexpected_index_list") or []]
            raised = bool(r.exception_info and r.exception_info.get("raised_exception"))
            if raised:
                log.warning("GX expectation %s on %s raised: %s", cfg.type, kwargs.get("column"),
                            r.exception_info.get("exception_message"))
            out.append({"expectation": cfg.type, "kwargs": kwargs, "success": bool(r.success), "rows": rows,
                        "error": r.exception_info.get("exception_message") if raised else None})
    # GX reports results grouped its own way; put them back in our order of precedence.
    order = {(_snake(name), kw.get("column")): i for i, (name, kw) in enumerate(_suite_spec(vcfg, has_split))}
    return sorted(out, key=lambda e: order.get((e["expectation"], e["kwargs"].get("column")), len(order)))


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def gx_reason(exp: dict, row: int, frame: pd.DataFrame, raw: pd.DataFrame, first_row: dict, vcfg) -> Reason | None:
    col, kind = exp["kwargs"].get("column"), exp["expectation"]
    if kind == "expect_column_values_to_not_be_null":
        return (f"{col} missing", f"{col} is missing" + (" (image path)" if col == "image" else ""))
    if kind == "expect_column_values_to_be_unique":
        rid = frame.at[row, "id"]
        first = first_row[rid]
        return None if first == row else ("duplicate id", f"duplicate id {rid!r} (first at row {first})")
    if kind == "expect_column_value_lengths_to_be_between":
        n = len(frame.at[row, "text"])
        if n == 0:
            return ("text empty", "text is empty (nothing left after removing whitespace and invisible characters)")
        if n < vcfg.min_text_chars:
            return ("text too short", f"text is too short ({n} characters, minimum {vcfg.min_text_chars})")
        return ("text too long", f"text is too long ({n} characters, maximum {vcfg.max_text_chars}: "
                "validation.max_text_chars)")
    if kind == "expect_column_values_to_be_in_set" and col == "label":
        return ("label not allowed", f"label {frame.at[row, 'label']!r} is not one of {sorted(vcfg.labels or [])} "
                "(validation.labels)")
    if kind == "expect_column_values_to_be_in_set" and col == "split":
        return ("split unknown", f"split value {raw.at[row, 'split']!r} is not one of train/val/test "
                "(also accepted: valid, validation, dev)")
    return (kind, f"failed {kind} on column {col}")
