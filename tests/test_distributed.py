"""One job over two processes (DistributedDataParallel over gloo, on the CPU): the same run as on
one process, checkpoints that resume in either, and a dead rank that fails the attempt."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from facegrad.pipeline import run_training_job
from facegrad.training import checkpoint as ckpt
from facegrad.training.config import TrainConfig
from facegrad.training.distributed import RankFailed
from facegrad.training.loop import Cancelled, Hooks
from tests.harness import rank_processes
from tests.test_training import _orl_faces

# A 2-process run computes the same batches and the same augmentations as a 1-process run (each
# rank takes half of every global batch) and averages the same gradients; what differs is the
# order of float additions (gradients reduced in buckets, convolutions over half-batches). After
# 4 epochs of SGD on this CPU the weights differ by 2e-5 of their norm and the epoch losses by
# 1e-5 of their value; the bounds below leave room for other CPUs' kernels. Averaging wrongly
# (summed gradients, a rank's half counted twice) moves the losses by far more.
LOSS_TOL = 1e-3
WEIGHT_TOL = 1e-3


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"architecture": "seed_cnn", "image_size": 48, "batch_size": 16,
                          "epochs": 4, "learning_rate": 0.02, "lr_schedule": "cosine",
                          "seed": 3, "data_loading": "memory", "calibration_identities": 0,
                          "optimizer": {"name": "sgd", "momentum": 0.9},
                          "clip": {"mode": "norm", "max_norm": 1.0}} | kw)


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    data = _orl_faces(8)
    folder = tmp_path_factory.mktemp("ddp-data")
    data.save(folder)
    return data, folder


def _weights(result) -> dict[str, torch.Tensor]:
    tensors, _ = ckpt.load(result.model_path.with_suffix(".json"))
    return {k: v for k, v in tensors.items() if k.startswith("model.")}


def _close(a: dict, b: dict) -> float:
    """||a - b|| / ||b|| over all the weights of two state dicts."""
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b)
    return (diff / sum(float(b[k].double().square().sum()) for k in b)) ** 0.5


@pytest.fixture(scope="module")
def one_process(faces, tmp_path_factory):
    data, folder = faces
    return run_training_job(_cfg(devices=1), data, tmp_path_factory.mktemp("ddp-1"),
                            dataset_dir=folder)


def test_two_processes_match_one(faces, one_process, tmp_path):
    data, folder = faces
    two = run_training_job(_cfg(devices=2), data, tmp_path, dataset_dir=folder)
    h1, h2 = one_process.history, two.history
    assert len(h1) == len(h2) == 4
    for a, b in zip(h1, h2):
        assert abs(a["train_loss"] - b["train_loss"]) <= LOSS_TOL * max(1.0, a["train_loss"])
        assert abs(a["val_loss"] - b["val_loss"]) <= LOSS_TOL * max(1.0, a["val_loss"])
        assert a["train_acc"] == pytest.approx(b["train_acc"], abs=1 / 64)
        assert a["val_acc"] == b["val_acc"]
        # clipping saw the same (all-reduced) gradients: the same norms, the same clipped steps
        ca, cb = a["clipping"], b["clipping"]
        assert ca["clipped_steps"] == cb["clipped_steps"] and ca["steps"] == cb["steps"]
        assert ca["grad_norm_pre"]["mean"] == pytest.approx(
            cb["grad_norm_pre"]["mean"], rel=1e-3)
    assert _close(_weights(two), _weights(one_process)) <= WEIGHT_TOL
    # rank 0 alone wrote the checkpoints and the model; the rank's spec and logs are gone
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.json")) == [
        f"epoch-000{i}.json" for i in range(1, 5)]
    assert not list(tmp_path.glob("rank*.log")) and not (tmp_path / "distributed.json").exists()


@pytest.mark.parametrize("clip", [
    {"mode": "threshold", "alpha": 0.5, "scope": "global"},  # the origin's T = alpha * max|g|
    {"mode": "agc", "clip_factor": 0.01},
])
def test_every_clip_mode_sees_the_whole_models_gradient(faces, tmp_path, clip):
    """The rules that look at the whole model (its largest gradient, each unit's weights) give
    2 processes what they give one: they run on the all-reduced gradients."""
    data, folder = faces
    runs = [run_training_job(_cfg(devices=n, epochs=2, clip=clip), data, tmp_path / str(n),
                             dataset_dir=folder) for n in (1, 2)]
    for a, b in zip(runs[0].history, runs[1].history):
        assert abs(a["train_loss"] - b["train_loss"]) <= LOSS_TOL * max(1.0, a["train_loss"])
        ca, cb = a["clipping"], b["clipping"]
        assert ca["clipped_steps"] == cb["clipped_steps"] > 0
        assert ca.get("zeroed") == cb.get("zeroed")
        assert ca["grad_norm_post"]["mean"] == pytest.approx(cb["grad_norm_post"]["mean"],
                                                             rel=1e-3)
    assert _close(_weights(runs[1]), _weights(runs[0])) <= WEIGHT_TOL


def _interrupted(cfg: TrainConfig, data, folder, run_dir: Path) -> Path:
    """Train ``cfg`` until it has written the epoch-2 checkpoint, cancel; the last checkpoint."""
    epochs = []
    hooks = Hooks(on_epoch=lambda r: epochs.append(r["epoch"]),
                  should_stop=lambda: len(epochs) >= 2)
    with pytest.raises(Cancelled):
        run_training_job(cfg, data, run_dir, hooks, dataset_dir=folder)
    found = sorted((run_dir / "checkpoints").glob("epoch-*.json"))
    assert found and 2 <= int(found[-1].stem[-4:]) < 4
    return found[-1]


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_a_checkpoint_resumes_on_the_other_number_of_processes(faces, one_process, tmp_path,
                                                               first, then):
    data, folder = faces
    last = _interrupted(_cfg(devices=first), data, folder, tmp_path / "a")
    resumed_at = []
    done = run_training_job(_cfg(devices=then), data, tmp_path / "a",
                            Hooks(on_resume=resumed_at.append), resume=last, dataset_dir=folder)
    assert resumed_at == [int(last.stem[-4:])]
    assert [h["epoch"] for h in done.history] == [1, 2, 3, 4]
    assert abs(done.history[-1]["train_loss"] - one_process.history[-1]["train_loss"]) <= (
        LOSS_TOL * max(1.0, one_process.history[-1]["train_loss"]))
    assert _close(_weights(done), _weights(one_process)) <= WEIGHT_TOL


def test_a_dead_rank_fails_the_attempt_at_once(faces, tmp_path):
    data, folder = faces
    started = threading.Event()
    outcome: dict = {}

    def run():
        hooks = Hooks(on_progress=lambda p: started.set(), progress_interval_s=0.0)
        try:
            run_training_job(_cfg(devices=2, epochs=200), data, tmp_path, hooks, dataset_dir=folder)
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            outcome["error"] = e

    t = threading.Thread(target=run)
    t.start()
    end = time.monotonic() + 120
    while not started.wait(0.2) and t.is_alive() and time.monotonic() < end:
        pass
    assert started.is_set(), f"the 2-process run did not start training: {outcome}"
    pids = rank_processes(os.getpid())
    assert len(pids) == 1
    killed = time.monotonic()
    os.kill(pids[0], signal.SIGKILL)
    t.join(120)
    assert not t.is_alive(), "rank 0 hung after its peer died"
    assert time.monotonic() - killed < 60
    err = outcome.get("error")
    assert isinstance(err, RankFailed), repr(err)
    assert "rank 1" in str(err) and "SIGKILL" in str(err)
    assert rank_processes(os.getpid()) == []
