"""Fine-tuning in several processes (``train.finetune.processes``): two gloo ranks on the CPU train, report each
epoch to the caller, write the same outputs and checkpoints as one process, resume after an interruption, reuse a
finished checkpoint without starting ranks, and turn a failing rank into a FinetuneError with no process left.

One interrupted-then-resumed two-process run on the tiny demo data (2 epochs, 64 px, 32 train rows) serves most
tests.
"""

import json
import re
import shutil

import numpy as np
import pandas as pd
import psutil
import pytest

from crossmodal.errors import FinetuneError, TrainError
from crossmodal.training import finetune
from crossmodal.training.distributed import run_ranks


class Interrupted(Exception):
    pass


def sum_ranks_then_report(payload, rank):
    """A rank target: the ranks' sum reaches rank 0, which reports it; with ``fail``, that rank raises instead."""
    if rank.rank == payload.get("fail"):
        raise RuntimeError(f"boom in rank {rank.rank}")
    total = rank.all_sum([rank.rank + 1.0, payload["value"]])
    if rank.is_main:
        rank.report({"total": total, "threads": __import__("torch").get_num_threads()})
    rank.barrier()


def _ranks_alive() -> list:
    """Rank processes of this test process that are still running."""
    return [p for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and "rank_main" in " ".join(p.cmdline())]


@pytest.fixture(scope="module")
def validated(tmp_path_factory, demo_dir, tiny_config):
    """The tiny demo data, validated."""
    from crossmodal.validation.validate import validate_manifest

    root = tmp_path_factory.mktemp("ddp-validated")
    return validate_manifest(demo_dir / "manifest.csv", tiny_config(root), root / "validated").validated_path


@pytest.fixture(scope="module")
def config(tiny_config):
    """``config(root, **finetune)``: tiny_config with two fine-tuning epochs, checkpoints under root/ckpt."""
    def make(root, **finetune):
        return tiny_config(root, train={"finetune": {"epochs": 2, "checkpoint_dir": str(root / "ckpt"), **finetune}})

    return make


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory, validated, config):
    """Two processes: interrupted by the caller after epoch 1, then resumed to the end."""
    root = tmp_path_factory.mktemp("ddp")
    cfg = config(root, processes=2)
    first, second = [], []

    def interrupt(epoch, row, model):
        first.append((epoch, row, model))
        raise Interrupted(f"stopped after epoch {epoch}")

    with pytest.raises(Interrupted):
        finetune.finetune_head(validated, cfg.train, cfg.encoders, root / "models", on_epoch_end=interrupt)
    left_running = _ranks_alive()
    (ckpt,) = (root / "ckpt").iterdir()
    after_interrupt = json.loads((ckpt / "checkpoint.json").read_text())
    info = finetune.finetune_head(validated, cfg.train, cfg.encoders, root / "models",
                                  on_epoch_end=lambda e, row, m: second.append((e, row, m)))
    return {"cfg": cfg, "root": root, "info": info, "first": first, "second": second, "ckpt": ckpt,
            "after_interrupt": after_interrupt, "left_running": left_running}


@pytest.mark.slow
def test_two_processes_write_the_outputs_of_one(ddp_run, validated):
    info = ddp_run["info"]
    head_dir = ddp_run["root"] / "models" / "finetune_xattn"
    assert info["processes"] == 2 and info["config"]["processes"] == 2
    assert json.loads((head_dir / "head.json").read_text()) == info
    assert [h["epoch"] for h in info["history"]] == [1, 2] and info["epochs_run"] == 2
    assert all(np.isfinite(h["train_loss"]) and 0 <= h["val_macro_f1"] <= 1 for h in info["history"])
    frame = pd.read_parquet(validated)
    labels = json.loads((ddp_run["root"] / "models" / "labels.json").read_text())
    assert labels == info["labels"] == sorted(frame["label"].unique())
    with np.load(head_dir / "predictions.npz") as npz:
        for split in ("val", "test"):
            rows = frame[frame["split"] == split]
            assert npz[f"{split}_ids"].tolist() == rows["id"].tolist()
            assert npz[f"{split}_y"].tolist() == [labels.index(lab) for lab in rows["label"]]
            assert npz[f"{split}_proba"].shape == (len(rows), len(labels))
            np.testing.assert_allclose(npz[f"{split}_proba"].sum(1), 1, atol=1e-4)
        assert npz["test_proba_missing_text"].shape == npz["test_proba"].shape
    assert (head_dir / "weights.safetensors").is_file()


@pytest.mark.slow
def test_the_caller_sees_each_epoch_and_an_interruption_resumes_at_the_next(ddp_run):
    r = ddp_run
    assert [(e, m) for e, _, m in r["first"]] == [(1, None)], "on_epoch_end runs here, without the ranks' model"
    assert r["left_running"] == [], "an exception in on_epoch_end must stop every rank"
    assert r["after_interrupt"]["epoch"] == 1, "the ranks must wait for on_epoch_end before the next epoch"
    assert [e for e, _, _ in r["second"]] == [2]
    assert r["info"]["resumed_from_epoch"] == 2
    assert r["first"][0][1] == r["info"]["history"][0] == r["after_interrupt"]["history"][0]
    assert r["second"][0][1] == r["info"]["history"][1]
    assert r["info"]["checkpoint"] == str(r["ckpt"])
    assert json.loads((r["ckpt"] / "checkpoint.json").read_text())["epoch"] == 2


@pytest.mark.slow
def test_a_finished_checkpoint_is_reused_without_starting_ranks(ddp_run, validated, monkeypatch):
    r = ddp_run

    def no_ranks(*args, **kwargs):
        raise AssertionError("a finished checkpoint must not start ranks")

    monkeypatch.setattr(finetune, "run_ranks", no_ranks)
    seen = []
    again = finetune.finetune_head(validated, r["cfg"].train, r["cfg"].encoders, r["root"] / "again",
                                   on_epoch_end=lambda e, row, m: seen.append(e))
    assert seen == [] and again["resumed_from_epoch"] == 3 and again["epochs_run"] == 2
    assert again["history"] == r["info"]["history"] and again["processes"] == 2
    with np.load(r["root"] / "models" / "finetune_xattn" / "predictions.npz") as before, \
            np.load(r["root"] / "again" / "finetune_xattn" / "predictions.npz") as after:
        np.testing.assert_allclose(before["test_proba"], after["test_proba"], atol=1e-5)


@pytest.mark.slow
def test_one_process_neither_reuses_nor_shares_the_checkpoint_of_two(ddp_run, validated, config, tmp_path):
    r = ddp_run
    cfg = config(r["root"], processes=1)  # same checkpoint_dir as the two-process run
    frame = pd.read_parquet(validated)
    keys = {n: finetune.fingerprint(frame, r["info"]["labels"], config(r["root"], processes=n).train,
                                    cfg.encoders, r["info"]["precision"]) for n in (1, 2, 3)}
    assert len(set(keys.values())) == 3
    assert r["ckpt"].name == keys[2][:24]
    seen = []
    info = finetune.finetune_head(validated, cfg.train, cfg.encoders, tmp_path / "models",
                                  on_epoch_end=lambda e, row, m: seen.append((e, m is not None)))
    assert info["processes"] == 1 and info["config"]["processes"] == 1
    assert seen == [(1, True), (2, True)] and info["resumed_from_epoch"] is None
    assert info["checkpoint"].rsplit("/", 1)[-1] == keys[1][:24]


@pytest.mark.slow
def test_every_rank_drops_an_unreadable_checkpoint_and_trains_from_the_start(ddp_run, validated, config, tmp_path):
    """Tensors of epoch 2 next to the JSON of epoch 1 (a crash between the two writes)."""
    copy = tmp_path / "ckpt" / ddp_run["ckpt"].name
    shutil.copytree(ddp_run["ckpt"], copy)
    meta = json.loads((copy / "checkpoint.json").read_text())
    (copy / "checkpoint.json").write_text(json.dumps({**meta, "epoch": 1}))
    cfg = config(tmp_path, processes=2)
    seen = []
    info = finetune.finetune_head(validated, cfg.train, cfg.encoders, tmp_path / "models",
                                  on_epoch_end=lambda e, row, m: seen.append(e))
    assert seen == [1, 2] and info["resumed_from_epoch"] is None and info["processes"] == 2
    assert _ranks_alive() == []


def test_a_failing_rank_is_a_finetune_error_naming_it_and_no_rank_is_left(validated, config, tmp_path):
    """Images deleted after validation: every rank fails while decoding; the caller gets one clear error."""
    frame = pd.read_parquet(validated)
    (tmp_path / "images").mkdir()
    for i, src in frame["image"].items():
        if isinstance(src, str) and src:
            frame.loc[i, "image"] = str(shutil.copy(src, tmp_path / "images"))
    frame.to_parquet(tmp_path / "validated.parquet")
    shutil.rmtree(tmp_path / "images")
    cfg = config(tmp_path, processes=2)
    with pytest.raises(FinetuneError, match=r"finetune_xattn rank [01] of 2 failed") as err:
        finetune.finetune_head(tmp_path / "validated.parquet", cfg.train, cfg.encoders, tmp_path / "models")
    message = str(err.value)
    assert re.search(r"validated\.parquet: row id 'm\d+': file not found; re-run `crossmodal validate`", message)
    assert "Traceback" not in message
    assert _ranks_alive() == []
    assert not (tmp_path / "models" / "finetune_xattn").exists()


def test_a_table_that_cannot_be_fine_tuned_is_refused_before_any_rank_starts(validated, config, tmp_path,
                                                                             monkeypatch):
    def no_ranks(*args, **kwargs):
        raise AssertionError("the caller checks the table before it starts ranks")

    monkeypatch.setattr(finetune, "run_ranks", no_ranks)
    cfg = config(tmp_path, processes=2)
    frame = pd.read_parquet(validated)
    frame.loc[frame["split"] == "val", "split"] = "test"
    frame.to_parquet(tmp_path / "no-val.parquet")
    with pytest.raises(FinetuneError, match="the val split .* has no rows"):
        finetune.finetune_head(tmp_path / "no-val.parquet", cfg.train, cfg.encoders, tmp_path / "models")


def test_ranks_reduce_together_and_report_to_the_caller_who_answers_first():
    reports = []
    run_ranks(f"{__name__}:sum_ranks_then_report", {"value": 2.0}, 2, on_report=reports.append)
    assert len(reports) == 1 and reports[0]["total"] == [3.0, 4.0]
    assert reports[0]["threads"] == max(1, len(psutil.Process().cpu_affinity()) // 2)
    assert _ranks_alive() == []


def test_a_crashing_rank_names_itself_and_its_traceback_and_its_peers_are_killed():
    with pytest.raises(TrainError, match=r"training rank 1 of 2 failed \(exit code 1\)") as err:
        run_ranks(f"{__name__}:sum_ranks_then_report", {"value": 1.0, "fail": 1}, 2)  # rank 0 waits in all_sum
    assert "RuntimeError: boom in rank 1" in str(err.value)
    assert _ranks_alive() == []
