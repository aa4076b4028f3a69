"""Serving: latency of the registered pyfunc model for one (image, text) pair, and batched throughput.

    .venv/bin/python -m benchmarks.predict [--quick]        # or: .venv/bin/python benchmarks/predict.py

It trains a fusion head on synthetic cached features (the encoders are the shipped pretrained ones, so what is
timed is the real serving path), logs it as the pyfunc the flow registers, registers it in a temporary MLflow
store, loads ``models:/NAME/1`` with ``mlflow.pyfunc.load_model`` and times ``predict``:

* one pair per call (image bytes + caption, as a REST request carries them): p50 and p99 latency;
* one call on a frame of B pairs (image paths): pairs/s, against the baseline of the same pairs one per call.

The last line is one JSON object: p50_ms, p99_ms, batch_pairs_per_s.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python benchmarks/predict.py`: import like `python -m benchmarks.predict`
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import random
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import check, emit, machine, parser, say
from benchmarks.extract import make_caption, make_jpeg
from benchmarks.train import make_features


def registered_model(root: Path, device: str):
    """Train a concat head, log it as the project's pyfunc, register it; returns the loaded pyfunc."""
    import logging

    import pandas as pd

    import mlflow
    from crossmodal.config import from_dict
    from crossmodal.serving.package import log_model
    from crossmodal.training.train import train_all

    logging.getLogger("mlflow").setLevel(logging.ERROR)
    cfg = from_dict({"encoders": {"device": device}, "train": {"heads": ["concat"], "max_epochs": 5},
                     "mlflow": {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
                                "artifact_root": str(root / "artifacts")},
                     # A batch-scoring job reads files: the model may read image paths under this folder only.
                     "serving": {"allowed_image_root": str(root)}})
    validated, image, text = make_features(root / "features", 600)
    train_all(validated, image, text, cfg.train, root / "models")
    mlflow.set_tracking_uri(cfg.mlflow.tracking_uri)
    mlflow.set_registry_uri(cfg.mlflow.tracking_uri)
    exp = mlflow.create_experiment("bench", artifact_location=(root / "artifacts").resolve().as_uri())
    example = root / "example.jpg"
    example.write_bytes(make_jpeg(0))
    with mlflow.start_run(experiment_id=exp):
        info = log_model(root / "models", "concat", cfg, pd.DataFrame({"image": [str(example)], "text": ["a dog"]}))
    version = mlflow.register_model(info.model_uri, "bench-model").version
    return mlflow.pyfunc.load_model(f"models:/bench-model/{version}")


def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, device=True)
    ap.add_argument("--calls", type=int, help="single-pair calls (default 200, quick 40)")
    ap.add_argument("--batch", type=int, help="pairs in the batched call (default 512, quick 128)")
    args = ap.parse_args(argv)

    import pandas as pd

    calls = args.calls or (40 if args.quick else 200)
    batch = args.batch or (128 if args.quick else 512)
    say(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="crossmodal-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        model = registered_model(root, args.device)
        say(f"trained, logged, registered and loaded the pyfunc in {time.perf_counter() - t0:.1f} s")
        rng = random.Random(0)
        (root / "images").mkdir()
        paths, texts = [], []
        for i in range(max(batch, calls)):
            path = root / "images" / f"{i}.jpg"
            path.write_bytes(make_jpeg(i))
            paths.append(str(path))
            texts.append(make_caption(rng))

        def one(i: int):
            return model.predict(pd.DataFrame({"image_bytes": [Path(paths[i]).read_bytes()], "text": [texts[i]]}))

        for i in range(3):
            one(i)  # warm-up: first-call allocations
        lat = []
        for i in range(calls):
            t0 = time.perf_counter()
            one(i)
            lat.append((time.perf_counter() - t0) * 1000)
        p50, p99 = float(np.percentile(lat, 50)), float(np.percentile(lat, 99))

        frame = pd.DataFrame({"image": paths[:batch], "text": texts[:batch]})
        t0 = time.perf_counter()
        out = model.predict(frame)
        batch_s = time.perf_counter() - t0
        assert len(out) == batch
        batch_rate = batch / batch_s
        single_rate = 1000 / float(np.mean(lat))

    say(f"\npyfunc models:/bench-model/1 (concat head, efficientnet_lite0 + all-MiniLM-L6-v2, device {args.device}):")
    say(f"  one pair per call ({calls} calls)    p50 {p50:7.1f} ms   p99 {p99:7.1f} ms   "
        f"= {single_rate:6.1f} pairs/s   1.00 x")
    say(f"  {batch} pairs in one call                                   "
        f"= {batch_rate:6.1f} pairs/s   {batch_rate / single_rate:.2f} x")
    say("targets:")
    check("p50 latency, one pair", p50, "<=", 50, " ms")
    check("batched throughput", batch_rate, ">=", 200, " pairs/s")
    result = {"p50_ms": p50, "p99_ms": p99, "batch_pairs_per_s": batch_rate}
    emit(result)
    return result


if __name__ == "__main__":
    main()
