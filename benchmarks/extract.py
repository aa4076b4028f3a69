"""Feature extraction: the project's path against a naive loop, peak memory at N and 4N, a cached and a grown re-run.

    .venv/bin/python -m benchmarks.extract --quick              # CPU, CI-friendly sizes
    .venv/bin/python -m benchmarks.extract --device cuda        # on a GPU machine: adds the GPU comparisons
    .venv/bin/python -m benchmarks.extract --grown              # only the grown-table case (below)

It writes N photo-like JPEGs (500 x 375, like COCO/Flickr pictures) and N captions into a temporary folder, then:

* naive: Pillow decode + resize per image (torchvision transforms), fp32, batch of one, in the main process (texts:
  one at a time, fp32);
* pipeline: ``extract_features`` as the flow calls it (decoding workers, batching, channels-last, bf16 where
  fast, length-bucketed text batches, the chunked feature store); images/s and texts/s of the cold run;
* peak RSS of ``extract_features`` over N and over 4N rows, each in a fresh subprocess (getrusage in the child);
* cached re-run: a second ``extract_features`` over the same table, as a fraction of the cold extract stage;
* with ``--device cuda`` also the bare encoder forward (the project's folded network) on random tensors already on
  the GPU, the project's path from preprocessed tensors (``FeatureExtractor.forward_images``), and the usual PyTorch
  pipeline (DataLoader, one worker per CPU core, Pillow decode and resize, pinned memory, bf16, channels-last).

The last line is one JSON object: naive_img_per_s, pipeline_img_per_s, speedup, naive_txt_per_s,
pipeline_txt_per_s, rss_ratio_4n_over_n, cached_rerun_fraction.

``--grown`` measures the per-item store instead: a cold ``extract_features`` over N JPEG rows, then over the table
grown by 10 % (new distinct images and captions appended, every row shuffled), both with the encoders already
loaded (their loading time is printed apart); it prints the grown run's time as a fraction of the cold run and both
runs' encoded/reused counts. Its last line: rows, grown_rows, cold_s, grown_s, grown_fraction, grown_cpu_fraction,
encoder_load_s, encoded, reused.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as `python benchmarks/extract.py`: import like `python -m benchmarks.extract`
    import pathlib
    import sys

    sys.path[0] = str(pathlib.Path(__file__).resolve().parents[1])

import argparse
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import check, emit, machine, parser, peak_rss_mb, say

WORDS = ("a man woman child dog cat bus train plate of food on the table street city beach mountain red blue green "
         "old new small large sitting standing walking next to with near under an image photo picture two three "
         "people riding bike holding umbrella sunny rainy day night wooden kitchen window park grass").split()


# --------------------------------------------------------------------------- data
def make_jpeg(i: int, w: int = 500, h: int = 375) -> bytes:
    """A photo-like JPEG: smooth gradients, a few shapes and sensor-like noise (so it compresses like a photo)."""
    import io

    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = rng.uniform(40, 200, 3)
    slope = rng.uniform(-0.25, 0.25, (3, 2))
    arr = np.stack([base[c] + slope[c, 0] * xx + slope[c, 1] * yy for c in range(3)], axis=-1)
    arr += rng.normal(0, 12, arr.shape)
    img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
        box = (x0, y0, x0 + rng.integers(20, 200), y0 + rng.integers(20, 150))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_caption(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))


def make_table(root: Path, n: int) -> list[dict]:
    """``n`` rows of (JPEG file, caption), written under ``root``; the rows, as in validated.parquet."""
    rng = random.Random(0)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        data = make_jpeg(i)
        path = root / "images" / f"{i:06d}.jpg"
        path.write_bytes(data)
        rows.append({"id": f"r{i}", "image": str(path), "text": make_caption(rng), "label": "ab"[i % 2],
                     "split": "train", "image_sha256": hashlib.sha256(data).hexdigest()})
    return rows


def write_validated(rows: list[dict], path: Path) -> Path:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return path


def encoders_config(device: str):
    from crossmodal.config import EncodersConfig

    return EncodersConfig(device=device)  # the shipped defaults, on the requested device


# --------------------------------------------------------------------------- measurements
def naive_images(fx, paths: list[str]) -> float:
    """Images/s of the loop a first script would run: Pillow decode and resize per image (torchvision transforms on
    the PIL image), fp32, batch of one, the network as loaded in its default layout."""
    import copy

    import torch
    from PIL import Image
    from torchvision import transforms

    enc = fx.image_encoder
    model = copy.deepcopy(enc.module).to(memory_format=torch.contiguous_format)  # as timm builds it: NCHW
    size = fx.cfg.image.image_size
    tf = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize(enc.mean, enc.std)])

    def one(p):
        with Image.open(p) as img:
            x = tf(img.convert("RGB"))
        with torch.inference_mode():
            return model(x.unsqueeze(0).to(fx.device)).cpu()

    one(paths[0])  # warm-up (first-call allocations)
    t0 = time.perf_counter()
    for p in paths:
        one(p)
    return len(paths) / (time.perf_counter() - t0)


def naive_texts(fx, texts: list[str]) -> float:
    import torch

    enc = fx.text_encoder

    def one(t):
        batch = enc.tokenizer([t], truncation=True, max_length=fx.cfg.text.max_length, return_tensors="pt")
        with torch.inference_mode():
            return enc.pool(enc.model(**batch.to(fx.device))[0], batch["attention_mask"]).cpu()

    one(texts[0])
    t0 = time.perf_counter()
    for t in texts:
        one(t)
    return len(texts) / (time.perf_counter() - t0)


def rss_child(validated: str, cache: str, device: str) -> None:
    """Run in a fresh process: extract_features over ``validated``, print the peak RSS as JSON."""
    import resource

    from crossmodal.features.extract import extract_features
    from crossmodal.hardware import resolve_device

    t0 = time.perf_counter()
    cfg = encoders_config(device)
    res = extract_features(validated, cfg, cache, progress=False)
    workers = 0.0
    if resolve_device(cfg.device).type != "cpu":
        # DataLoader decoding workers (on a CPU every core decodes in a thread of this process instead). The children's
        # peak also counts short-lived helpers, such as the `ldconfig -p` a library import runs, which report the
        # memory they inherited at fork: an upper bound.
        unit = 1024 * 1024 if sys.platform == "darwin" else 1024
        workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / unit
    # Main process plus the largest worker process: an upper bound of what the run held at once.
    print(json.dumps({"rows": res.rows, "peak_rss_mb": peak_rss_mb() + workers, "main_mb": peak_rss_mb(),
                      "worker_mb": workers, "seconds": time.perf_counter() - t0}))


def measure_rss(validated: Path, cache: Path, device: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.extract", "--rss-child", str(validated), str(cache), "--device", device]
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, check=False)
    if out.returncode != 0:
        raise SystemExit(f"RSS child failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def gpu_comparisons(fx, paths: list[str], seconds: float) -> dict:
    """Bare encoder forward, the project's forward from preprocessed tensors, and the usual DataLoader+Pillow."""
    import torch
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    enc, dev, size = fx.image_encoder, fx.device, fx.cfg.image.image_size
    bs = fx.image_batch_size
    fmt = torch.channels_last if enc.channels_last else torch.contiguous_format
    reps = max(4, len(paths) // bs)

    # 1. bare forward: random normalised input already on the GPU, bf16 autocast, channels-last, no copies; the
    #    network the project runs (BatchNorm folded), so the ratio below is the cost of the data path alone.
    x = torch.randn(bs, 3, size, size, device=dev).contiguous(memory_format=fmt)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _ in range(3):
            fx.image_module(x)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fx.image_module(x)
        torch.cuda.synchronize()
    bare = reps * bs / (time.perf_counter() - t0)

    # 2. the project's forward from preprocessed uint8 tensors in pinned host memory (copy, normalise, encode, back).
    u8 = torch.randint(0, 256, (bs, 3, size, size), dtype=torch.uint8).pin_memory()
    fx.forward_images(u8)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fx.forward_images(u8)
    from_tensors = reps * bs / (time.perf_counter() - t0)

    # 3. the usual pipeline: DataLoader with one worker per core, Pillow decode + resize, pinned memory, bf16, the
    #    network as loaded (no BatchNorm folding).
    tf = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(size), transforms.ToTensor(),
                             transforms.Normalize(enc.mean, enc.std)])

    class Files(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            return tf(Image.open(paths[i]).convert("RGB"))

    from crossmodal.hardware import usable_cores

    workers = usable_cores()
    loader = DataLoader(Files(), batch_size=bs, num_workers=workers, pin_memory=True, prefetch_factor=4)
    t0 = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        for xb in loader:
            enc.module(xb.to(dev, non_blocking=True).contiguous(memory_format=fmt)).float().cpu()
    usual = len(paths) / (time.perf_counter() - t0)
    project = len(paths) / seconds
    say(f"GPU ({torch.cuda.get_device_name(0)}), batch {bs}, {workers} CPU workers for the usual pipeline:")
    say(f"  bare encoder forward (random tensors on the GPU)      {bare:10.0f} img/s")
    say(f"  project, from preprocessed tensors (forward_images)   {from_tensors:10.0f} img/s  "
        f"= {from_tensors / bare:.2f} x bare forward")
    say(f"  usual DataLoader + Pillow pipeline (from JPEG files)  {usual:10.0f} img/s")
    say(f"  project, from JPEG files (extract_features)           {project:10.0f} img/s  "
        f"= {project / bare:.2f} x bare forward, {project / usual:.2f} x the usual pipeline")
    check("GPU from tensors / bare forward", from_tensors / bare, ">=", 0.9)
    check("GPU from JPEG files / usual pipeline", project / usual, ">=", 4.0)
    return {"bare": bare, "from_tensors": from_tensors, "usual": usual, "project": project}


def grown_table(args) -> dict:
    """Cold extraction of N rows, then of those rows plus 10 % new ones, shuffled: only the new items are encoded."""
    from crossmodal.features.extract import extract_features
    from crossmodal.features.extractor import FeatureExtractor

    n = args.n or (256 if args.quick else (4096 if args.device == "cuda" else 1024))
    extra = max(1, n // 10)
    cfg = encoders_config(args.device)
    say(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="crossmodal-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        rows = make_table(root / "data", n + extra)
        say(f"wrote {len(rows)} JPEGs (500x375) and captions in {time.perf_counter() - t0:.1f} s")
        validated = write_validated(rows[:n], root / "validated.parquet")
        grown_rows = rows[: n + extra]
        random.Random(1).shuffle(grown_rows)
        grown = write_validated(grown_rows, root / "grown.parquet")

        t0 = time.perf_counter()
        fx = FeatureExtractor(cfg)
        fx.image_encoder, fx.text_encoder  # noqa: B018  (load both before timing)
        load_s = time.perf_counter() - t0
        fx.embed_images([rows[0]["image"]] * 4), fx.embed_texts([rows[0]["text"]] * 4)  # warm-up
        say(f"encoders: {cfg.image.name} at {cfg.image.image_size} px, {cfg.text.name} (max {cfg.text.max_length} "
            f"tokens); device {fx.device}, precision {fx.precision}; loaded in {load_s:.1f} s")

        t0, c0 = time.perf_counter(), time.process_time()
        cold = extract_features(validated, cfg, root / "cache", progress=False, extractor=fx)
        cold_s, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
        t0, c0 = time.perf_counter(), time.process_time()
        again = extract_features(grown, cfg, root / "cache", progress=False, extractor=fx)
        grown_s, grown_cpu = time.perf_counter() - t0, time.process_time() - c0

        say(f"\ncold: {n} rows in {cold_s:.2f} s; encoded {cold.encoded}, reused {cold.reused}")
        say(f"grown by {extra} new rows ({n + extra} rows, shuffled): {grown_s:.2f} s = {grown_s / cold_s:.3f} of the "
            f"cold run; encoded {again.encoded}, reused {again.reused}")
        say(f"  CPU time of this process: cold {cold_cpu:.1f} s, grown {grown_cpu:.1f} s = {grown_cpu / cold_cpu:.3f} "
            "(less sensitive than wall time to other work on the machine)")
        say(f"  (a run that loads the encoders itself adds {load_s:.1f} s to either)")
        say("targets (2-core CPU):")
        check("grown re-run / cold", grown_s / cold_s, "<=", 0.15)
    result = {"rows": n, "grown_rows": n + extra, "cold_s": cold_s, "grown_s": grown_s,
              "grown_fraction": grown_s / cold_s, "grown_cpu_fraction": grown_cpu / cold_cpu,
              "encoder_load_s": load_s, "encoded": again.encoded,
              "reused": again.reused}
    emit(result)
    return result


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = parser(__doc__, device=True)
    ap.add_argument("--n", type=int, help="rows for the throughput runs (default 1024, quick 256; GPU 4096)")
    ap.add_argument("--naive", type=int, help="images and texts for the naive loops (default 64, quick 24)")
    ap.add_argument("--rss-n", type=int, help="N of the memory runs, which also run 4N (default 512, quick 96)")
    ap.add_argument("--grown", action="store_true",
                    help="only the grown-table case: N rows cold, then N + 10 %% new rows, shuffled")
    ap.add_argument("--rss-child", nargs=2, metavar=("VALIDATED", "CACHE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_child:
        rss_child(*args.rss_child, args.device)
        return {}
    if args.grown:
        return grown_table(args)

    from crossmodal.features.extract import CHUNK_ROWS, extract_features
    from crossmodal.features.extractor import FeatureExtractor

    cuda = args.device == "cuda"
    n = args.n or (256 if args.quick else (4096 if cuda else 1024))
    n_naive = args.naive or (24 if args.quick else 64)
    rss_n = args.rss_n or (96 if args.quick else 512)
    cfg = encoders_config(args.device)
    say(f"machine: {machine()}")
    with tempfile.TemporaryDirectory(prefix="crossmodal-bench-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        rows = make_table(root / "data", max(n, 4 * rss_n, n_naive))
        say(f"wrote {len(rows)} JPEGs (500x375) and captions in {time.perf_counter() - t0:.1f} s")
        validated = write_validated(rows[:n], root / "validated.parquet")

        fx = FeatureExtractor(cfg)
        fx.image_encoder, fx.text_encoder  # noqa: B018  (load both before timing)
        say(f"encoders: {cfg.image.name} at {cfg.image.image_size} px, {cfg.text.name} (max {cfg.text.max_length} "
            f"tokens); device {fx.device}, precision {fx.precision}, image batch {fx.image_batch_size}")

        paths = [r["image"] for r in rows[:n_naive]]
        texts = [r["text"] for r in rows[:n_naive]]
        naive_img = naive_images(fx, paths)
        naive_txt = naive_texts(fx, texts)
        fx.embed_images(paths[:4]), fx.embed_texts(texts[:4])  # warm-up of the batched path

        t0 = time.perf_counter()
        cold = extract_features(validated, cfg, root / "cache", progress=False, extractor=fx)
        cold_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        warm = extract_features(validated, cfg, root / "cache", progress=False)
        warm_s = time.perf_counter() - t0
        assert warm.computed == {"image": False, "text": False}, warm.computed
        pipe_img = n / cold.seconds["image"]
        pipe_txt = n / cold.seconds["text"]

        small = write_validated(rows[:rss_n], root / "rss_n.parquet")
        large = write_validated(rows[: 4 * rss_n], root / "rss_4n.parquet")
        rss_small = measure_rss(small, root / "rss_cache_n", args.device)
        rss_large = measure_rss(large, root / "rss_cache_4n", args.device)
        rss_ratio = rss_large["peak_rss_mb"] / rss_small["peak_rss_mb"]

        say(f"\nimages ({n} for the pipeline, {n_naive} for the naive loop):")
        say(f"  naive loop (Pillow per image, fp32, batch 1)   {naive_img:8.1f} img/s   1.00 x")
        say(f"  project's path (extract_features, cold)        {pipe_img:8.1f} img/s   {pipe_img / naive_img:.2f} x")
        say("texts:")
        say(f"  naive loop (one at a time, fp32)               {naive_txt:8.1f} txt/s   1.00 x")
        say(f"  project's path (extract_features, cold)        {pipe_txt:8.1f} txt/s   {pipe_txt / naive_txt:.2f} x")
        say(f"peak RSS of extract_features in a fresh process (feature chunks of {CHUNK_ROWS} distinct inputs):")
        for label, r, ratio in (("N ", rss_small, 1.0), ("4N", rss_large, rss_ratio)):
            say(f"  {label} = {r['rows']:6d} rows: {r['peak_rss_mb']:8.1f} MiB   {ratio:.3f} x   (main process "
                f"{r['main_mb']:.1f} + largest decoding worker process {r['worker_mb']:.1f})")
        say("cached re-run of the extract stage (same table, features served from the cache):")
        say(f"  cold {cold_s:.2f} s, cached {warm_s:.3f} s = {warm_s / cold_s:.4f} of the cold extract stage")
        say("targets (2-core CPU):")
        check("pipeline / naive images", pipe_img / naive_img, ">=", 4.0, " x")
        check("peak RSS 4N / N", rss_ratio, "<=", 1.2, " x")
        check("cached re-run / cold (extract stage)", warm_s / cold_s, "<=", 0.05)
        if cuda:
            gpu_paths = [r["image"] for r in rows[:n]]
            gpu_comparisons(fx, gpu_paths, cold.seconds["image"])

    result = {
        "naive_img_per_s": naive_img, "pipeline_img_per_s": pipe_img, "speedup": pipe_img / naive_img,
        "naive_txt_per_s": naive_txt, "pipeline_txt_per_s": pipe_txt, "rss_ratio_4n_over_n": rss_ratio,
        "cached_rerun_fraction": warm_s / cold_s,
    }
    emit(result)
    return result


if __name__ == "__main__":
    main()
