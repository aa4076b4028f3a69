"""Validation throughput on a large manifest whose rows share images (as captions of one photo do).

Usage::

    .venv/bin/python benchmarks/validate.py --rows 1000000 --images 200

Writes the manifest (one row in 1000 names a missing file) into a temporary folder and times
``validate_manifest`` (the real stage: row checks, the Great Expectations suite, the outputs). Baseline in the same run:
the time to read the manifest alone (``read_manifest``), so the ratio says what validation costs over parsing.
Prints the figures; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.validation.hostile writes the manifest

from crossmodal.config import from_dict  # noqa: E402
from crossmodal.data.manifest import read_manifest  # noqa: E402
from crossmodal.validation.validate import validate_manifest  # noqa: E402
from tests.validation.hostile import write_many_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--images", type=int, default=200)
    args = ap.parse_args()
    cfg = from_dict({"validation": {"max_quarantine_fraction": 0.5}})
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        manifest = write_many_rows(tmp / "data", args.rows, distinct_images=args.images, bad_every=1000)
        t_write = time.perf_counter() - t0
        t0 = time.perf_counter()
        read_manifest(manifest)
        t_read = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = validate_manifest(manifest, cfg, tmp / "out")
        t_validate = time.perf_counter() - t0
        assert res.rows_in == res.rows_kept + res.rows_quarantined
        report = json.loads(res.report_path.read_text())
    out = {"rows": res.rows_in, "kept": res.rows_kept, "quarantined": res.rows_quarantined,
           "distinct_images": args.images, "write_s": round(t_write, 2), "read_manifest_s": round(t_read, 2),
           "validate_s": round(t_validate, 2), "rows_per_s": round(res.rows_in / t_validate),
           "validate_over_read": round(t_validate / t_read, 1), "report_seconds": report["seconds"]}
    print(f"{res.rows_in:,} rows ({args.images} distinct images): read {t_read:.1f} s, validate {t_validate:.1f} s "
          f"({out['rows_per_s']:,} rows/s, {out['validate_over_read']}x the read alone); "
          f"{res.rows_kept:,} kept + {res.rows_quarantined:,} quarantined")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
