"""Load test of the served model: ``mlflow models serve`` on 127.0.0.1, many concurrent clients, loopback only.

Usage::

    .venv/bin/python benchmarks/serve_load.py                      # 50 clients x 20 requests, a tiny trained model
    .venv/bin/python benchmarks/serve_load.py --clients 8 --requests 5 --model-uri models:/crossmodal-fusion@champion

Without ``--model-uri`` it trains a tiny model first (demo data, one head) and registers it in a temporary store.
Each request is one row: a JPEG as base64 in ``image_bytes`` plus a caption. Baseline in the same run: one client
sending the same number of requests one after another; the figures are latency percentiles, errors (must be 0) and
throughput, with the concurrent p50 as a ratio of the sequential one. Prints the figures; the last line is JSON.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

MODEL_NAME = "crossmodal-fusion"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(workdir: Path, allowed_image_root: str | None = None) -> tuple[str, Path]:
    """Train one small head on the demo data and register it; returns (tracking URI, demo data folder)."""
    import mlflow
    from crossmodal.config import from_dict
    from crossmodal.data.demo import generate_demo
    from crossmodal.features.extract import extract_features
    from crossmodal.serving.package import log_model
    from crossmodal.training.train import train_all
    from crossmodal.validation.validate import validate_manifest

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = from_dict({
        "demo": {"rows": 120, "image_size": 48, "seed": 3, "bad_rows": False},
        "encoders": {"image": {"image_size": 64, "batch_size": 32}, "text": {"max_length": 32}},
        "train": {"heads": ["concat"], "max_epochs": 10, "patience": 3, "hidden_dim": 32},
        "mlflow": {"tracking_uri": uri, "artifact_root": str(workdir / "artifacts")},
        "serving": {"allowed_image_root": allowed_image_root},
    })
    data = workdir / "data"
    manifest = generate_demo(data, cfg.demo)
    validated = validate_manifest(manifest, cfg, workdir / "validated")
    feats = extract_features(validated.validated_path, cfg.encoders, workdir / "cache")
    train_all(validated.validated_path, feats.image_path, feats.text_path, cfg.train, workdir / "models")
    import pandas as pd

    frame = pd.read_parquet(validated.validated_path)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    exp = mlflow.create_experiment("serve-load", artifact_location=(workdir / "artifacts").resolve().as_uri())
    with mlflow.start_run(experiment_id=exp):
        info = log_model(workdir / "models", "concat", cfg, frame[frame["split"] == "test"])
    mlflow.register_model(info.model_uri, MODEL_NAME)
    return uri, data


def serve(model_uri: str, tracking_uri: str, port: int, log_path: Path) -> subprocess.Popen:
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    # MLflow starts uvicorn by name: the venv's bin folder must be on PATH even when the venv is not activated.
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true",
           "PATH": f"{mlflow_cli.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    log = open(log_path, "wb")
    return subprocess.Popen([str(mlflow_cli), "models", "serve", "-m", model_uri, "--env-manager", "local",
                             "-h", "127.0.0.1", "-p", str(port), "-w", "1"], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def wait_ready(port: int, proc: subprocess.Popen, timeout_s: float = 240) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        if proc.poll() is not None:
            raise RuntimeError(f"the model server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as r:
                if r.status == 200:
                    return time.perf_counter() - t0
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"the model server did not answer /ping within {timeout_s:.0f} s")


def stop(proc: subprocess.Popen) -> None:
    import signal

    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (uvicorn workers included)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def invoke(port: int, columns: list[str], rows: list[list], timeout_s: float = 120) -> tuple[int, dict]:
    """POST one dataframe_split request; returns (HTTP status, decoded JSON body)."""
    body = json.dumps({"dataframe_split": {"columns": columns, "data": rows}}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def run_clients(port: int, clients: int, requests: int, payloads: list[list]) -> dict:
    """``clients`` threads, each sending ``requests`` one-row requests; latencies in ms, errors counted."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients)

    def client(k: int) -> None:
        start.wait()
        for j in range(requests):
            row = payloads[(k * requests + j) % len(payloads)]
            t0 = time.perf_counter()
            try:
                status, body = invoke(port, ["image_bytes", "text"], [row])
                ok = status == 200 and len(body.get("predictions", [])) == 1
            except Exception as err:  # a refused or dropped connection is an error to count, not to raise
                status, ok, body = -1, False, {"error": repr(err)}
            ms = (time.perf_counter() - t0) * 1000
            with lock:
                latencies.append(ms)
                if not ok:
                    errors.append(f"{status}: {str(body)[:200]}")

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 1)

    return {"clients": clients, "requests_per_client": requests, "requests": len(lat), "errors": len(errors),
            "error_samples": errors[:3], "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
            "max_ms": round(lat[-1], 1), "wall_s": round(wall, 2), "throughput_rps": round(len(lat) / wall, 1)}


def payloads_from(folder: Path, n: int = 40) -> list[list]:
    images = sorted(folder.glob("images/*.jpg"))[:n]
    return [[base64.b64encode(p.read_bytes()).decode(), f"caption number {k}, what a day"]
            for k, p in enumerate(images)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=20, help="requests per client")
    ap.add_argument("--model-uri", default=None, help="serve this model (needs MLFLOW_TRACKING_URI for models:/)")
    ap.add_argument("--images", type=Path, default=None, help="folder with images/*.jpg for the payloads")
    args = ap.parse_args()
    from crossmodal.environment import set_env_defaults

    set_env_defaults()  # the offline, quiet defaults, before Prefect and MLflow read their settings

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        if args.model_uri:
            tracking_uri, model_uri = os.environ.get("MLFLOW_TRACKING_URI", ""), args.model_uri
            data = args.images or Path("data/demo")
        else:
            tracking_uri, data = build_model(tmp)
            model_uri = f"models:/{MODEL_NAME}/1"
        build_s = time.perf_counter() - t0
        port = free_port()
        proc = serve(model_uri, tracking_uri, port, tmp / "server.log")
        try:
            try:
                ready_s = wait_ready(port, proc)
            except (RuntimeError, TimeoutError):
                sys.stderr.write((tmp / "server.log").read_text(errors="replace")[-4000:])
                raise
            payloads = payloads_from(data)
            run_clients(port, 2, 2, payloads)  # warm-up (first-call costs are not load)
            baseline = run_clients(port, 1, args.requests, payloads)
            loaded = run_clients(port, args.clients, args.requests, payloads)
        finally:
            stop(proc)
    out = {"model_build_s": round(build_s, 1), "server_ready_s": round(ready_s, 1), "sequential": baseline,
           "concurrent": loaded, "p50_ratio_concurrent_over_sequential": round(loaded["p50_ms"] / baseline["p50_ms"], 1)}
    print(f"sequential (1 client x {args.requests}): p50 {baseline['p50_ms']} ms, p99 {baseline['p99_ms']} ms, "
          f"{baseline['throughput_rps']} req/s, errors {baseline['errors']}")
    print(f"concurrent ({args.clients} clients x {args.requests}): p50 {loaded['p50_ms']} ms, p99 {loaded['p99_ms']} ms, "
          f"{loaded['throughput_rps']} req/s, errors {loaded['errors']} of {loaded['requests']}")
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
