"""Scale-out: the heads on 50,000 cached rows and the extraction of the quick-size JPEGs, on 1 and on 2 Dask workers.

    .venv/bin/python -m benchmarks.scale [--quick] [--rows N] [--images N]   # or: .venv/bin/python benchmarks/scale.py

Both halves run the flow's own tasks (``flows.training``) through ``flows.execution.Execution`` on a Dask
``LocalCluster`` of single-threaded worker processes, first with one worker (the baseline), then with two, in this
one run:

* heads: ``flows.training.run_train`` (every frozen-feature head of the default list, stacking's folds included) on
  the synthetic features of ``benchmarks.train`` (1280-d image, 384-d text);
* extraction: ``flows.training.extract_stage`` over a table of photo-like JPEGs and captions
  (``benchmarks.extract``), shards of ``--shard-items`` distinct items, into an empty feature store each time.

Printed per case: wall seconds with 1 and 2 workers and their ratio; the sum of the tasks' own seconds (the work)
and the longest task; the cluster's start-up; what each task reads. Those figures give the scaling model in
docs/scale-out.md. The last line is one JSON object: rows, images, train_seconds, extract_seconds (per worker
count), train_speedup, extract_speedup, per-task seconds and the start-up seconds.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python benchmarks/scale.py`: import like `python -m benchmarks.scale`
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import tempfile
import time
from pathlib import Path

from benchmarks import emit, machine, parser, say

TARGET_ROWS = 50_000


def _cluster_start(workers: int) -> float:
    """Seconds to start a LocalCluster of ``workers`` single-threaded processes and see them all (then stopped)."""
    from distributed import Client, LocalCluster

    t0 = time.perf_counter()
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(workers)
        return time.perf_counter() - t0


def _train(root: Path, rows: int, workers: int, heads: list[str]) -> dict:
    import yaml

    from benchmarks.train import make_features
    from flows.training import run_train

    validated, image, text = make_features(root / "features", rows)
    params = root / f"params-{workers}.yaml"
    params.write_text(yaml.safe_dump({
        "train": {"heads": heads, "finetune": {"enabled": False}},
        "paths": {"cache": str(root / "cache"), "work": str(root / "work")},
        "orchestration": {"task_runner": "dask", "workers": workers}}))
    t0 = time.perf_counter()
    result = run_train(str(validated), str(image), str(text), str(root / f"models-{workers}"), str(params))
    return {"seconds": time.perf_counter() - t0, "tasks": result["tasks"],
            "bytes_read": image.stat().st_size + text.stat().st_size + validated.stat().st_size}


def _extract(root: Path, images: int, workers: int, shard_items: int) -> dict:
    from prefect import flow

    from benchmarks.extract import make_table, write_validated
    from crossmodal.config import from_dict
    from crossmodal.files import file_sha256
    from flows.execution import Execution
    from flows.training import extract_stage

    table = root / "table"
    if not (table / "validated.parquet").is_file():
        write_validated(make_table(table, images), table / "validated.parquet")
    cfg = from_dict({"orchestration": {"task_runner": "dask", "workers": workers, "shard_items": shard_items}})
    cache = root / f"cache-{workers}"
    validated = {"validated_path": str(table / "validated.parquet"),
                 "data_hash": file_sha256(table / "validated.parquet") + f"-{workers}"}  # no Prefect cache hit

    @flow(name="benchmark-extract")
    def run() -> tuple[dict, list]:
        with Execution(cfg.orchestration) as ex:
            features, _ = extract_stage(ex, validated, cfg.model_dump(), str(cache))
            return features, ex.tasks

    t0 = time.perf_counter()
    features, tasks = run()
    return {"seconds": time.perf_counter() - t0, "tasks": tasks, "encoded": features["encoded"]}


def _work(tasks: list[dict], prefix: str) -> tuple[float, float, int]:
    mine = [t["seconds"] for t in tasks if t["name"].startswith(prefix) and t["seconds"] is not None]
    return sum(mine), max(mine, default=0.0), len(mine)


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, quick="CI-friendly sizes (10,000 rows)")
    ap.add_argument("--rows", type=int, help=f"rows of cached features (default {TARGET_ROWS:,}, quick 10,000)")
    ap.add_argument("--images", type=int, default=256, help="JPEG rows to extract (default 256, the quick size "
                                                            "of benchmarks.extract)")
    ap.add_argument("--shard-items", type=int, default=64, help="distinct items per extraction task (default 64)")
    ap.add_argument("--heads", help="comma-separated heads (default: the default frozen-feature heads)")
    args = ap.parse_args(argv)

    from crossmodal.config import TrainConfig
    from crossmodal.heads.registry import HEADS

    rows = args.rows or (10_000 if args.quick else TARGET_ROWS)
    heads = args.heads.split(",") if args.heads else [h for h in TrainConfig().heads if h in HEADS]
    say(f"machine: {machine()}")
    start = {n: _cluster_start(n) for n in (1, 2)}
    out: dict = {"rows": rows, "images": args.images, "heads": heads, "cluster_start_seconds": start}
    with tempfile.TemporaryDirectory(prefix="crossmodal-scale-") as tmp:
        root = Path(tmp)
        train = {n: _train(root / "train", rows, n, heads) for n in (1, 2)}
        extract = {n: _extract(root / "extract", args.images, n, args.shard_items) for n in (1, 2)}

    say(f"\ncluster start-up: 1 worker {start[1]:.1f} s, 2 workers {start[2]:.1f} s")
    work, longest, count = _work(train[1]["tasks"], ("train-", "fold-", "base-"))
    say(f"\nheads on {rows:,} cached rows ({len(heads)} heads, {count} tasks; each worker reads "
        f"{train[1]['bytes_read'] / 2**20:,.0f} MiB of features once):")
    say(f"  1 worker  (baseline)  {train[1]['seconds']:8.1f} s   1.00 x")
    say(f"  2 workers             {train[2]['seconds']:8.1f} s   {train[1]['seconds'] / train[2]['seconds']:.2f} x "
        "faster")
    say(f"  the tasks' own seconds: {work:.1f} s in all, longest {longest:.1f} s, {work / max(count, 1):.2f} s each "
        "on average")
    ework, elongest, ecount = _work(extract[1]["tasks"], "extract-")
    say(f"\nextraction of {args.images} JPEGs + captions ({ecount} tasks of up to {args.shard_items} items; "
        f"encoded {extract[1]['encoded']}):")
    say(f"  1 worker  (baseline)  {extract[1]['seconds']:8.1f} s   1.00 x")
    say(f"  2 workers             {extract[2]['seconds']:8.1f} s   "
        f"{extract[1]['seconds'] / extract[2]['seconds']:.2f} x faster")
    say(f"  the shard tasks' own seconds: {ework:.1f} s in all, longest {elongest:.1f} s (the first task on a worker "
        "also loads the encoders)")
    out.update({
        "train_seconds": {n: train[n]["seconds"] for n in (1, 2)},
        "train_speedup": train[1]["seconds"] / train[2]["seconds"],
        "train_task_seconds": work, "train_longest_task": longest, "train_tasks": count,
        "extract_seconds": {n: extract[n]["seconds"] for n in (1, 2)},
        "extract_speedup": extract[1]["seconds"] / extract[2]["seconds"],
        "extract_task_seconds": ework, "extract_longest_task": elongest, "extract_tasks": ecount,
    })
    emit(out)
    return out


if __name__ == "__main__":
    main()
