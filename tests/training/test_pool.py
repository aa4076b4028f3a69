"""Training heads on several processes: the same files to the bit as one process, work shared by the calling
process and a worker, errors in a worker raised as the same clear error, and how many processes "auto" picks."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest

from crossmodal.config import TrainConfig
from crossmodal.errors import TrainError
from crossmodal.training import pool as train_pool
from crossmodal.training.pool import RemoteTraceback, plan_workers, run_tasks
from crossmodal.training.train import train_all

FAST = dict(hidden_dim=16, dropout=0.1, lr=1e-2, batch_size=32, max_epochs=6, patience=3)


# ---------------------------------------------------------------- tasks run by the worker (imported there by name)


def load_marker(tag: str) -> str:
    return f"loaded in {tag} by {os.getpid()}"


def where(task, data, context) -> tuple:
    """Which process ran the task and with which data; the calling process is slowed so the worker gets some."""
    if os.getpid() == context["parent"]:
        time.sleep(0.3)
    return os.getpid(), data


def fails_in_worker(task, data, context):
    if os.getpid() == context["parent"]:
        time.sleep(0.5)  # the worker takes the other task meanwhile
        return "fine here"
    if context["how"] == "user":
        raise TrainError("head 'concat': training loss became nan at epoch 3; lower train.lr (now 10.0)")
    if context["how"] == "bug":
        return {}["no such key"]
    os._exit(3)  # the worker process dies


# ---------------------------------------------------------------- the pool itself


def test_tasks_are_shared_between_this_process_and_a_worker_that_loads_its_own_data():
    parent = os.getpid()
    tasks = [("t", i) for i in range(6)]
    results = run_tasks(tasks, where, "data here", {"parent": parent}, lanes=2, load=(load_marker, ("worker",)))
    assert set(results) == set(tasks)
    pids = {pid for pid, _ in results.values()}
    assert parent in pids and len(pids) == 2, pids
    for pid, data in results.values():
        assert data == ("data here" if pid == parent else f"loaded in worker by {pid}")


def test_costliest_tasks_start_first():
    order = []
    run_tasks([("a", 1), ("b", 3), ("c", 2)], lambda task, data, context: order.append(task), None, {}, lanes=1,
              cost=lambda task: task[1])
    assert order == [("b", 3), ("c", 2), ("a", 1)]


def test_a_user_error_in_a_worker_is_raised_as_itself_without_the_pool():
    context = {"parent": os.getpid(), "how": "user"}
    with pytest.raises(TrainError) as info:
        run_tasks([("head", "concat"), ("head", "gated")], fails_in_worker, None, context, lanes=2,
                  load=(load_marker, ("w",)))
    assert str(info.value) == "head 'concat': training loss became nan at epoch 3; lower train.lr (now 10.0)"
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_a_bug_in_a_worker_keeps_its_type_and_the_worker_traceback():
    context = {"parent": os.getpid(), "how": "bug"}
    with pytest.raises(KeyError, match="no such key") as info:
        run_tasks([("head", "concat"), ("head", "gated")], fails_in_worker, None, context, lanes=2,
                  load=(load_marker, ("w",)))
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "fails_in_worker" in str(info.value.__cause__)


def test_a_worker_that_dies_gives_a_train_error_naming_the_task():
    context = {"parent": os.getpid(), "how": "die"}
    with pytest.raises(TrainError, match=r"worker process training head '(concat|gated)' stopped \(.*exit code 3"
                                          r".*set train\.workers to 1"):
        run_tasks([("head", "concat"), ("head", "gated")], fails_in_worker, None, context, lanes=2,
                  load=(load_marker, ("w",)))


def test_plan_workers(monkeypatch):
    monkeypatch.setattr(train_pool, "usable_cores", lambda: 4)
    monkeypatch.setattr(train_pool, "available_memory", lambda: 8 * 2**30)
    enough = train_pool.PARALLEL_MIN_SECONDS
    assert plan_workers("auto", enough / 2, 10, 2**20) == 1  # little work: one process
    assert plan_workers("auto", enough, 10, 2**20) == 4  # one per core
    assert plan_workers("auto", enough, 3, 2**20) == 3  # never more than the tasks
    assert plan_workers("auto", enough, 10, 3 * 2**30) == 2  # 1 + 4 GiB // 3 GiB copies of the features
    assert plan_workers(3, 0.0, 10, 2**20) == 3 and plan_workers(8, 0.0, 2, 2**20) == 2  # as set, up to the tasks
    assert plan_workers(4, enough, 1, 2**20) == 1


# ---------------------------------------------------------------- train_all on two processes


def test_two_processes_write_the_same_files_as_one(tmp_path, write_inputs):
    paths, _ = write_inputs(tmp_path / "data", n=400, labels=("a", "b", "c"))
    heads = ["image_only", "text_only", "concat", "gated", "late", "attention", "stacking"]
    results = {}
    for workers in (1, 2):
        cfg = TrainConfig(**FAST, heads=heads, workers=workers, stacking={"folds": 3})
        results[workers] = train_all(*paths, cfg, tmp_path / f"w{workers}")
    assert results[1].workers == 1 and results[2].workers == 2
    assert results[1].val_macro_f1 == results[2].val_macro_f1
    assert results[1].epochs_run == results[2].epochs_run
    for name in heads:
        one, two = tmp_path / "w1" / name, tmp_path / "w2" / name
        assert (one / "weights.safetensors").read_bytes() == (two / "weights.safetensors").read_bytes(), name
        with np.load(one / "predictions.npz") as a, np.load(two / "predictions.npz") as b:
            assert a.files == b.files
            for key in a.files:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")
        meta = [json.loads((d / "head.json").read_text()) for d in (one, two)]
        for m in meta:
            m.pop("train_seconds")
            m["config"].pop("workers")
        assert meta[0] == meta[1], name
