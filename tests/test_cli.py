"""The client commands of the ``facegrad`` CLI, run as real subprocesses against the service."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from facegrad.service.client_cli import parse_clip
from tests.harness import ROOT, orl_folder

SUBSET = 5  # identities: enough for a model, small enough to train in seconds


def facegrad(service, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, FACEGRAD_URL=service.url, PYTHONPATH=str(ROOT), COLUMNS="200")
    env.pop("FACEGRAD_API_KEY", None)
    return subprocess.run([sys.executable, "-m", "facegrad.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def ok(r: subprocess.CompletedProcess) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout}\nstderr:\n{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def subset_dir(orl, tmp_path_factory):
    """5 ORL identities as a folder of identity folders (copied to a temp dir, never the repo),
    plus a stray file at the top level that the upload must leave out."""
    train, _ = orl
    root = tmp_path_factory.mktemp("cli") / "faces5"
    for label in sorted(train)[:SUBSET]:
        (root / label).mkdir(parents=True)
        for p in train[label]:
            shutil.copy(p, root / label / p.name)
    (root / "README.txt").write_text("not an identity")
    return root


@pytest.fixture(scope="module")
def trained(service, subset_dir):
    """Upload with the CLI, then train with --clip norm:5 --wait."""
    ds = json.loads(ok(facegrad(service, "dataset", "upload", str(subset_dir), "--name",
                                "cli-faces", "--json")))
    r = facegrad(service, "train", "--dataset", ds["id"], "--arch", "facenet_s", "--clip",
                 "norm:5", "--epochs", "3", "--image-size", "32", "--batch-size", "8", "--lr",
                 "0.003", "--seed", "1", "--wait", "--poll", "0.5")
    return ds, r


def test_clip_specs():
    assert parse_clip("norm:5") == {"mode": "norm", "max_norm": 5}
    assert parse_clip("norm:5:per_tensor") == {"mode": "norm", "max_norm": 5,
                                               "scope": "per_tensor"}
    assert parse_clip("value:1") == {"mode": "value", "clip_value": 1}
    assert parse_clip("threshold:0.9") == {"mode": "threshold", "alpha": 0.9}
    assert parse_clip("agc:0.01") == {"mode": "agc", "clip_factor": 0.01}
    assert parse_clip("autoclip:10") == {"mode": "autoclip", "percentile": 10}
    assert parse_clip("none") == {"mode": "none"}
    assert parse_clip("norm:2:norm_type=inf:fail") == {"mode": "norm", "max_norm": 2,
                                                      "norm_type": "inf", "on_nonfinite": "fail"}
    import typer

    for bad in ("bogus:1", "none:3", "value:1:2", "agc:scope=global"):
        with pytest.raises(typer.BadParameter):
            parse_clip(bad)


def test_upload_and_list(service, trained):
    ds, _ = trained
    assert ds["num_identities"] == SUBSET and ds["num_images"] == SUBSET * 7
    assert ds["rejected"] == {}  # the stray top-level file was left out by the client
    out = ok(facegrad(service, "dataset", "list"))
    assert ds["id"] in out and "cli-faces" in out
    listed = json.loads(ok(facegrad(service, "dataset", "list", "--json")))
    assert ds["id"] in [d["id"] for d in listed["items"]]


def test_train_wait_show_identify_models(service, trained, orl):
    ds, r = trained
    assert r.returncode == 0, (r.stdout, r.stderr, service.tail("worker1.log"))
    out = r.stdout
    assert "succeeded" in out and "norm" in out
    assert "100%" in r.stderr  # the progress bar reached its end
    jobs = json.loads(ok(facegrad(service, "jobs", "list", "--json")))
    job = next(j for j in jobs["items"] if j["dataset_id"] == ds["id"])
    assert job["status"] == "succeeded" and job["config"]["clip"]["max_norm"] == 5.0
    assert job["config"]["image_size"] == 32 and job["config"]["epochs"] == 3

    shown = ok(facegrad(service, "jobs", "show", job["id"]))
    assert job["id"] in shown and "succeeded" in shown and job["model_id"] in shown
    assert "norm post mean" in shown  # the per-epoch clipping table
    as_json = json.loads(ok(facegrad(service, "jobs", "show", job["id"], "--json")))
    assert as_json["id"] == job["id"] and as_json["clipping"]["steps"] > 0
    hist = json.loads(ok(facegrad(service, "jobs", "metrics", job["id"], "--json")))
    assert [h["epoch"] for h in hist["history"]] == [1, 2, 3]

    _, test = orl
    label = sorted(test)[0]
    img = test[label][0]
    table = ok(facegrad(service, "identify", str(img), "--model", job["model_id"],
                        "--top-k", "3"))
    assert str(img) in table and "confidence" in table
    doc = json.loads(ok(facegrad(service, "identify", str(img), str(test[label][1]), "--model",
                                 job["model_id"], "--top-k", "2", "--json")))
    assert doc["model_id"] == job["model_id"] and len(doc["results"]) == 2
    face = doc["results"][0]["faces"][0]
    assert len(face["candidates"]) == 2
    assert face["identity"] is None or face["identity"] in sorted(test)[:SUBSET]
    unknown = ok(facegrad(service, "identify", str(img), "--model", job["model_id"],
                          "--threshold", "1"))
    assert "unknown" in unknown

    models = ok(facegrad(service, "models", "list"))
    assert job["model_id"] in models
    listed = json.loads(ok(facegrad(service, "models", "list", "--json")))
    assert job["model_id"] in [m["id"] for m in listed["items"]]


def test_errors(service, trained):
    missing = "00000000-0000-4000-8000-000000000000"
    r = facegrad(service, "train", "--dataset", missing, "--epochs", "1")
    assert r.returncode == 1
    assert f"no dataset with id {missing}" in r.stderr and "404" in r.stderr
    assert r.stdout == ""

    ds, _ = trained
    r = facegrad(service, "train", "--dataset", ds["id"], "--arch", "seed_cnn", "--epochs", "0")
    assert r.returncode == 1 and "epochs" in r.stderr and "422" in r.stderr

    r = facegrad(service, "train", "--dataset", ds["id"], "--clip", "bogus:1")
    assert r.returncode == 2 and "unknown clip mode" in r.stderr

    r = facegrad(service, "jobs", "show", missing)
    assert r.returncode == 1 and "no job with id" in r.stderr

    r = facegrad(service, "jobs", "list", "--url", "http://127.0.0.1:9")  # nothing listens
    assert r.returncode == 1 and "cannot reach" in r.stderr


def test_wait_reports_a_failed_job(service, trained):
    """--wait exits 1 with the job's error when the job fails (CUDA asked of a CPU worker)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the worker has CUDA here: a cuda job would not fail")
    ds, _ = trained
    r = facegrad(service, "train", "--dataset", ds["id"], "--arch", "seed_cnn", "--epochs", "1",
                 "--image-size", "32", "--device", "cuda", "--wait", "--poll", "0.3")
    assert r.returncode == 1, r
    assert "failed" in r.stderr and "no CUDA GPU" in r.stderr


def test_wait_reports_a_cancelled_job(service, trained):
    """jobs cancel stops a running job; the client waiting on it exits 1 saying so."""
    ds, _ = trained
    env = dict(os.environ, FACEGRAD_URL=service.url, PYTHONPATH=str(ROOT))
    waiting = subprocess.Popen(
        [sys.executable, "-m", "facegrad.cli", "train", "--dataset", ds["id"],
         "--epochs", "500",
         "--arch", "seed_cnn", "--image-size", "32", "--batch-size", "4", "--wait", "--poll",
         "0.3", "--json"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        job = None
        while time.time() < deadline and job is None:
            time.sleep(0.5)
            jobs = json.loads(ok(facegrad(service, "jobs", "list", "--status", "running",
                                          "--json")))
            job = next((j for j in jobs["items"] if j["dataset_id"] == ds["id"]
                        and j["config"]["epochs"] == 500), None)
        assert job is not None, "the job never started"
        out = ok(facegrad(service, "jobs", "cancel", job["id"]))
        assert job["id"] in out
        stdout, stderr = waiting.communicate(timeout=120)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 1, (stdout, stderr)
    assert f"job {job['id']} was cancelled" in stderr
    assert json.loads(stdout)["status"] == "cancelled"  # --json still prints the final job


def test_upload_follows_the_ingest_and_train_waits_for_it(service, orl, tmp_path):
    """``dataset upload`` follows the ingest with a progress bar (``--no-wait`` returns at
    once); ``train`` on a dataset still ingesting waits until it is ready, then posts the job
    (refused here by the server for ``--epochs 0`` with seed_cnn: nothing trains)."""
    big = tmp_path / "faces-twice"
    for label, paths in orl_folder().items():  # 800 images: several seconds of ingest
        (big / label).mkdir(parents=True)
        for p in paths:
            for copy in ("a", "b"):
                shutil.copy(p, big / label / f"{copy}-{p.name}")
    out = ok(facegrad(service, "dataset", "upload", str(big), "--no-wait"))
    assert "ingesting 0/800 files" in out, out
    dataset_id = re.search(r"facegrad dataset show ([0-9a-f-]{36})", out).group(1)
    r = facegrad(service, "train", "--dataset", dataset_id, "--arch", "seed_cnn", "--epochs",
                 "0", "--poll", "0.2")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"dataset {dataset_id} is still ingesting; waiting until it is ready" in r.stderr
    assert "800/800" in r.stderr  # the progress bar reached its end
    assert "epochs" in r.stderr and "422" in r.stderr  # the job was posted once it was ready
    shown = ok(facegrad(service, "dataset", "show", dataset_id))
    assert "40 identities, 800 images" in shown

    train, _ = orl
    small = tmp_path / "faces3"
    for label in sorted(train)[:3]:
        (small / label).mkdir(parents=True)
        for p in train[label]:
            shutil.copy(p, small / label / p.name)
    r = facegrad(service, "dataset", "upload", str(small), "--name", "cli-followed")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "ingesting its images" in r.stderr and "21/21" in r.stderr
    assert "3 identities, 21 images" in r.stdout


# --- facegrad sweep ---------------------------------------------------------------------------

SWEEP_JOB = ("--arch", "seed_cnn", "--image-size", "32", "--batch-size", "16")


@pytest.fixture(scope="module")
def sweep_ds(service, subset_dir):
    return json.loads(ok(facegrad(service, "dataset", "upload", str(subset_dir), "--name",
                                  "cli-sweep-faces", "--json")))


@pytest.fixture(scope="module")
def waited_sweep(service, sweep_ds):
    """2 clip settings x 2 seeds, 2 epochs each, followed with --wait."""
    r = facegrad(service, "sweep", "--dataset", sweep_ds["id"], "--clip", "none", "--clip",
                 "norm:5:per_tensor", "--seeds", "2", "--epochs", "2", *SWEEP_JOB,
                 "--name", "cli-sweep", "--wait", "--poll", "0.5", timeout=600)
    sweeps = json.loads(ok(facegrad(service, "sweep", "list", "--json")))["items"]
    sweep = next(s for s in sweeps if s["name"] == "cli-sweep")
    return sweep, r


def test_sweep_help():
    r = subprocess.run([sys.executable, "-m", "facegrad.cli", "sweep", "--help"], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, COLUMNS="200"))
    out = ok(r)
    for word in ("--dataset", "--clip", "--lr", "--seeds", "--wait", "--metric", "show",
                 "cancel", "list"):
        assert word in out, word


def test_sweep_wait_prints_the_leaderboard(service, waited_sweep):
    sweep, r = waited_sweep
    assert r.returncode == 0, (r.stdout, r.stderr, service.tail("worker1.log"))
    assert sweep["status"] == "succeeded" and len(sweep["job_ids"]) == 4
    assert sweep["progress"]["succeeded"] == 4
    assert f"sweep {sweep['id']}" in r.stderr and "4/4" in r.stderr  # the bar reached its end
    out = r.stdout
    assert "leaderboard by val_acc" in out and "succeeded" in out
    assert "clip=none" in out and "clip=norm:max_norm=5,scope=per_tensor" in out
    assert " ± " in out  # mean ± sd over the 2 seeds
    jobs = [json.loads(ok(facegrad(service, "jobs", "show", j, "--json")))
            for j in sweep["job_ids"]]
    assert sorted((j["config"]["clip"]["mode"], j["config"]["seed"]) for j in jobs) == \
        [("none", 0), ("none", 1), ("norm", 0), ("norm", 1)]
    assert all(j["config"]["epochs"] == 2 and j["config"]["image_size"] == 32 for j in jobs)


def test_sweep_show(service, waited_sweep):
    sweep, _ = waited_sweep
    csv_text = ok(facegrad(service, "sweep", "show", sweep["id"], "--csv"))
    rows = list(csv.reader(io.StringIO(csv_text)))
    assert len(rows) == 3, csv_text  # a header and one row per setting
    assert rows[0][:4] == ["clip", "runs", "succeeded", "failed"] and "val_acc_mean" in rows[0]
    assert sorted(r[0] for r in rows[1:]) == ["none", "norm:max_norm=5,scope=per_tensor"]
    assert all(r[1:4] == ["2", "2", "0"] for r in rows[1:])

    table = ok(facegrad(service, "sweep", "show", sweep["id"], "--metric", "best_val_loss"))
    assert sweep["id"] in table and "succeeded" in table
    assert "leaderboard by best_val_loss (lowest first" in table
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    (ROOT / "test-artifacts" / "cli-sweep-show.txt").write_text(table)
    doc = json.loads(ok(facegrad(service, "sweep", "show", sweep["id"], "--json")))
    assert doc["id"] == sweep["id"] and len(doc["leaderboard"]["rows"]) == 2
    assert all(row["runs"] == 2 and row["succeeded"] == 2 for row in doc["leaderboard"]["rows"])
    assert sweep["id"] in ok(facegrad(service, "sweep", "list"))


def test_sweep_errors(service, sweep_ds):
    r = facegrad(service, "sweep", "--dataset", sweep_ds["id"], "--clip", "none", "--seeds",
                 "1000", *SWEEP_JOB)
    assert r.returncode == 1 and "1000 jobs" in r.stderr and "422" in r.stderr
    r = facegrad(service, "sweep", "--dataset", sweep_ds["id"], "--clip", "threshold:2",
                 *SWEEP_JOB)
    assert r.returncode == 1 and "alpha" in r.stderr and "422" in r.stderr
    r = facegrad(service, "sweep", "--dataset", sweep_ds["id"], "--clip", "bogus:1")
    assert r.returncode == 2 and "unknown clip mode" in r.stderr
    r = facegrad(service, "sweep", "show", "00000000-0000-4000-8000-000000000000")
    assert r.returncode == 1 and "no sweep with id" in r.stderr


def test_sweep_cancel(service, sweep_ds):
    """sweep cancel stops a long sweep; the client waiting on it exits 1 saying so."""
    env = dict(os.environ, FACEGRAD_URL=service.url, PYTHONPATH=str(ROOT))
    waiting = subprocess.Popen(
        [sys.executable, "-m", "facegrad.cli", "sweep", "--dataset", sweep_ds["id"],
         "--clip", "none", "--clip", "value:1", "--seeds", "2", "--epochs", "500", *SWEEP_JOB,
         "--name", "cli-long-sweep", "--wait", "--poll", "0.3"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        sweep = None
        while time.time() < deadline and sweep is None:
            time.sleep(0.5)
            items = json.loads(ok(facegrad(service, "sweep", "list", "--json")))["items"]
            sweep = next((s for s in items if s["name"] == "cli-long-sweep"
                          and s["progress"]["running"]), None)
        assert sweep is not None, "the sweep never started"
        out = ok(facegrad(service, "sweep", "cancel", sweep["id"]))
        assert sweep["id"] in out and "cancel" in out
        ok(facegrad(service, "sweep", "cancel", sweep["id"]))  # idempotent
        stdout, stderr = waiting.communicate(timeout=120)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 1, (stdout, stderr)
    assert f"sweep {sweep['id']} cancelled" in stderr
    doc = json.loads(ok(facegrad(service, "sweep", "show", sweep["id"], "--json")))
    assert doc["status"] == "cancelled" and doc["progress"]["cancelled"] == 4
