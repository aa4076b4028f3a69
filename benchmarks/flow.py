"""The whole training flow run cold, then again with nothing changed: the cached re-run as a share of the cold run.

    .venv/bin/python -m benchmarks.flow [--quick]        # or: .venv/bin/python benchmarks/flow.py

Data: the embedded demo dataset (``crossmodal.data.demo.generate_demo``), by default at the shipped size and settings
(1,500 rows plus the deliberately broken ones, every head including the fine-tuned one), as ``crossmodal demo``
runs it. ``--quick``: 300 rows of 64 px images, without the fine-tuned head and the scikit-learn baselines.

Everything lives in a temporary folder (data, ``paths.cache``, ``work/``, the MLflow store); Prefect runs on its
ephemeral API with a temporary ``PREFECT_HOME`` (``prefect_test_harness``, as the tests do). Both runs happen in
this one process, after a warm-up that starts Prefect's API and runs an empty flow: the one-time start-up
(reported on its own) is in neither run, so the cold run is not inflated by it. The cold run includes loading the
encoders and everything else a first run does.

Printed: both runs' seconds, per stage cold vs cached (from the stage records the flow returns), what the cached
run spends its time on, and the target (cached <= 5 % of cold) with PASS/FAIL. The last line is one JSON object:
cold_s, cached_s, cached_rerun_fraction, startup_s, overhead_s (the cached run outside its stages: Prefect's
flow and task bookkeeping), rows, heads and stages ({stage: {cold_s, cached_s, cold_cached, cached}}).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python benchmarks/flow.py`: import like `python -m benchmarks.flow`
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import os
import shutil
import tempfile
import time
from pathlib import Path

from benchmarks import check, emit, machine, parser, say

TARGET_FRACTION = 0.05
QUICK_HEADS = ["image_only", "text_only", "concat", "gated", "add", "late", "attention", "stacking"]


def _params(root: Path, rows: int, quick: bool) -> dict:
    params = {
        "data": {"manifest": str(root / "data" / "manifest.csv")},
        "demo": {"rows": rows},
        "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow' / 'mlflow.db'}",
                   "artifact_root": str(root / "mlflow" / "artifacts")},
        "paths": {"work": str(root / "work"), "cache": str(root / "cache"), "reports": str(root / "reports"),
                  "summary": str(root / "reports" / "summary.json")},
    }
    if quick:
        params["demo"]["image_size"] = 64
        params["train"] = {"heads": QUICK_HEADS, "finetune": {"enabled": False}}
    return params


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, quick="CI-friendly size: 300 rows, no fine-tuning, no baselines")
    ap.add_argument("--rows", type=int, help="demo rows (default 1,500, quick 300)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder and print where it is")
    args = ap.parse_args(argv)
    rows = args.rows or (300 if args.quick else 1500)

    root = Path(tempfile.mkdtemp(prefix="crossmodal-bench-flow-"))
    os.environ["PREFECT_HOME"] = str(root / "prefect")  # before Prefect is imported: results and database here
    cwd = os.getcwd()
    os.chdir(root)  # nothing lands in the caller's folder (MLflow, GX and DVC look at the working directory)
    try:
        return _bench(root, rows, args.quick)
    finally:
        os.chdir(cwd)
        if args.keep:
            say(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


def _bench(root: Path, rows: int, quick: bool) -> dict:
    import yaml

    from crossmodal.environment import set_env_defaults

    set_env_defaults()  # the offline, quiet defaults, before Prefect and MLflow read their settings
    from crossmodal.config import from_dict
    from crossmodal.data.demo import generate_demo

    params = _params(root, rows, quick)
    cfg = from_dict(params)
    generate_demo(root / "data", cfg.demo)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    heads = [h for h in cfg.train.heads if h != "finetune_xattn" or cfg.train.finetune.enabled]
    say(f"machine: {machine()}")
    say(f"data: demo, {cfg.demo.rows:,} rows + broken ones, {cfg.demo.image_size} px; {len(heads)} heads"
        f"{' incl. fine-tuning' if 'finetune_xattn' in heads else ''}; stores under {root}")

    t0 = time.perf_counter()
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):

        @flow(name="warm-up")
        def warm_up() -> None:
            return None

        warm_up()
        import mlflow  # noqa: F401  (imported by the first run otherwise)
        from flows.training import run_training

        startup_s = time.perf_counter() - t0
        runs = {}
        for name in ("cold", "cached"):
            t0 = time.perf_counter()
            # As `crossmodal run` without a Prefect server: the harness's API ends with this process, no heartbeats.
            summary = run_training(str(root / "params.yaml"), heartbeats=False)
            runs[name] = (time.perf_counter() - t0, summary)
    (cold_s, cold), (cached_s, cached) = runs["cold"], runs["cached"]
    fraction = cached_s / cold_s

    say(f"\none-time start-up (Prefect's API, an empty flow, imports), in neither run: {startup_s:.1f} s")
    say(f"  {'stage':<9} {'cold s':>8} {'cached s':>9}   re-run")
    stages = {}
    for stage, rec in cached["stages"].items():
        before = cold["stages"][stage]
        stages[stage] = {"cold_s": round(before["seconds"], 3), "cached_s": round(rec["seconds"], 3),
                         "cold_cached": before["cached"], "cached": rec["cached"]}
        say(f"  {stage:<9} {before['seconds']:>8.2f} {rec['seconds']:>9.3f}   "
            f"{'cached' if rec['cached'] else 'COMPUTED'}")
    overhead = cached_s - sum(rec["seconds"] for rec in cached["stages"].values())
    say(f"  {'flow':<9} {cold_s - sum(r['seconds'] for r in cold['stages'].values()):>8.2f} {overhead:>9.3f}   "
        "Prefect's flow run outside the tasks")
    say(f"  {'total':<9} {cold_s:>8.2f} {cached_s:>9.3f}")
    inner = {s: r.get("stage_seconds") for s, r in cached["stages"].items() if r.get("stage_seconds") is not None}
    say("the cached run: " + ", ".join(f"{s} {v * 1000:.0f} ms in the stage" for s, v in inner.items())
        + f"; the rest is Prefect's task and flow bookkeeping ({overhead:.2f} s outside the tasks)")
    registered = (f"unchanged since version {cached['unchanged_since_version']}, nothing registered"
                  if cached["unchanged"] else f"registered again as version {cached['mlflow']['version']}")
    say(f"the model of the cached run: {registered}")
    say("targets:")
    check("cached re-run / cold run (whole flow)", fraction, "<=", TARGET_FRACTION)
    result = {"cold_s": cold_s, "cached_s": cached_s, "cached_rerun_fraction": fraction, "startup_s": startup_s,
              "overhead_s": overhead, "rows": cfg.demo.rows, "heads": len(heads), "stages": stages}
    emit(result)
    return result


if __name__ == "__main__":
    main()
