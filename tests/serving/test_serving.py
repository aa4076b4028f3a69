"""Serving: images as bytes or base64; paths only under serving.allowed_image_root, never outside it.

The default run checks FusedModel.predict's input handling directly (a refused path is refused before anything is
read or encoded). The slow tests serve a registered model with ``mlflow models serve`` on 127.0.0.1 and send real
HTTP requests, then run the load test (benchmarks/serve_load.py: 50 clients x 20 requests, errors must be 0).
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from benchmarks import serve_load  # importable: pytest puts the repository root first on the path
from crossmodal.errors import PredictionInputError
from crossmodal.serving.fused_model import FusedModel
from crossmodal.serving.package import save_model_dir


@pytest.fixture(scope="module")
def model_dir(tiny_run, tmp_path_factory):
    best = tiny_run["metrics"]["best_head"]
    return save_model_dir(tiny_run["models"], best, tiny_run["cfg"].encoders, tmp_path_factory.mktemp("m") / "m")


@pytest.fixture(scope="module")
def refusing(model_dir):
    return FusedModel.load(model_dir)  # no allowed root: the default


@pytest.fixture(scope="module")
def root_and_model(model_dir, tmp_path_factory, tiny_test_rows):
    """A model allowed to read under ``root``; ``root`` holds one image, a symlink out, and a sibling folder."""
    base = tmp_path_factory.mktemp("serving")
    root, outside = base / "allowed", base / "allowed-not"  # a sibling whose name starts like the root
    root.mkdir()
    outside.mkdir()
    src = tiny_test_rows(1)["image"].item()
    (root / "photo.jpg").write_bytes(Path(src).read_bytes())
    (outside / "secret.jpg").write_bytes(Path(src).read_bytes())
    os.symlink(outside / "secret.jpg", root / "link.jpg")
    os.symlink("/etc", root / "etc")
    return root, FusedModel.load(model_dir, allowed_image_root=str(root))


def _frame(image=None, image_bytes=None, text="a caption"):
    data = {"text": [text]}
    if image is not None:
        data["image"] = [image]
    if image_bytes is not None:
        data["image_bytes"] = [image_bytes]
    return pd.DataFrame(data)


def test_paths_refused_by_default(refusing, tiny_test_rows):
    path = tiny_test_rows(1)["image"].item()
    for p in (path, "/etc/passwd", "../../etc/passwd"):
        with pytest.raises(PredictionInputError, match="image paths are refused by this model"):
            refusing.predict(_frame(image=p))


def test_bytes_and_base64_accepted(refusing, tiny_test_rows):
    data = Path(tiny_test_rows(1)["image"].item()).read_bytes()
    a = refusing.predict(_frame(image_bytes=data))
    b = refusing.predict(_frame(image_bytes=base64.b64encode(data).decode()))
    pd.testing.assert_frame_equal(a, b)
    with pytest.raises(PredictionInputError, match="'image_bytes' is text but not base64"):
        refusing.predict(_frame(image_bytes="not base64 at all!"))


@pytest.mark.parametrize("bad", ["/etc/passwd", "../allowed-not/secret.jpg", "../../../../etc/passwd",
                                 "link.jpg", "etc/passwd", "photo.jpg/../../allowed-not/secret.jpg"])
def test_paths_outside_the_root_refused(root_and_model, bad):
    root, model = root_and_model
    with pytest.raises(PredictionInputError, match="outside the allowed image root"):
        model.predict(_frame(image=bad))


def test_paths_inside_the_root_accepted(root_and_model):
    root, model = root_and_model
    rel = model.predict(_frame(image="photo.jpg"))
    absolute = model.predict(_frame(image=str(root / "photo.jpg")))
    pd.testing.assert_frame_equal(rel, absolute)
    by_bytes = model.predict(_frame(image_bytes=(root / "photo.jpg").read_bytes()))
    pd.testing.assert_frame_equal(rel, by_bytes)


def test_allowed_root_is_stored_in_the_model(model_dir, tiny_run, tmp_path):
    best = tiny_run["metrics"]["best_head"]
    folder = save_model_dir(tiny_run["models"], best, tiny_run["cfg"].encoders, tmp_path / "m",
                            allowed_image_root=str(tmp_path))
    assert json.loads((folder / "model.json").read_text())["allowed_image_root"] == str(tmp_path.resolve())
    assert FusedModel.load(folder).allowed_image_root == str(tmp_path.resolve())
    assert json.loads((model_dir / "model.json").read_text())["allowed_image_root"] is None


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A model trained and registered with an allowed image root, served by `mlflow models serve`."""
    base = tmp_path_factory.mktemp("served")
    root = base / "data"
    uri, data = serve_load.build_model(base, allowed_image_root=str(root))
    (base / "outside").mkdir()
    (base / "outside" / "x.jpg").write_bytes(next(data.glob("images/*.jpg")).read_bytes())
    os.symlink(base / "outside" / "x.jpg", root / "escape.jpg")
    port = serve_load.free_port()
    proc = serve_load.serve(f"models:/{serve_load.MODEL_NAME}/1", uri, port, base / "server.log")
    try:
        serve_load.wait_ready(port, proc)
        yield port, data
    finally:
        serve_load.stop(proc)


@pytest.mark.slow
def test_server_accepts_bytes_and_allowed_paths_refuses_the_rest(served):
    port, data = served
    image = sorted(data.glob("images/*.jpg"))[0]
    b64 = base64.b64encode(image.read_bytes()).decode()
    status, body = serve_load.invoke(port, ["image_bytes", "text"], [[b64, "what a day"]])
    assert status == 200 and len(body["predictions"]) == 1
    by_bytes = body["predictions"][0]
    status, body = serve_load.invoke(port, ["image", "text"], [[f"images/{image.name}", "what a day"]])
    assert status == 200 and body["predictions"][0] == by_bytes
    for bad in ("/etc/passwd", "../../../../../etc/passwd", "escape.jpg"):
        status, body = serve_load.invoke(port, ["image", "text"], [[bad, "what a day"]])
        assert 400 <= status < 500, (bad, status, body)
        assert "outside the allowed image root" in body["message"], body
        assert "root:" not in json.dumps(body)  # nothing of /etc/passwd comes back


@pytest.mark.slow
def test_load_50_clients_x_20_requests(served):
    port, data = served
    payloads = serve_load.payloads_from(data)
    serve_load.run_clients(port, 2, 2, payloads)  # warm-up
    result = serve_load.run_clients(port, 50, 20, payloads)
    print(json.dumps(result))
    assert result["requests"] == 1000 and result["errors"] == 0, result["error_samples"]
    assert result["p99_ms"] >= result["p50_ms"] > 0
