"""The whole user path against real processes: upload, train on a Celery worker, identify."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx

from tests.harness import ROOT, accuracy, free_port, upload, wait_job


def test_train_and_identify_on_redis(client, orl, orl_model):
    _, test = orl
    job = orl_model["job"]
    assert job["dataset_id"] == orl_model["dataset"]["id"]
    assert orl_model["dataset"]["num_identities"] == 40
    assert orl_model["dataset"]["num_images"] == 280
    # telemetry and progress as a user sees them
    clip = job["clipping"]
    assert clip["steps"] > 0 and 0.0 <= clip["clip_fraction"] <= 1.0
    assert clip["grad_norm_pre"]["max"] >= clip["grad_norm_post"]["max"]
    assert job["progress"]["fraction"] == 1.0 and job["checkpoints"]
    assert job["progress"]["stage"] == "done"
    hist = client.get(f"/v1/jobs/{job['id']}/metrics").json()["history"]
    assert len(hist) == job["config"]["epochs"]
    assert all("clipping" in h for h in hist)
    model = client.get(f"/v1/models/{orl_model['model_id']}").json()
    assert model["architecture"] == "dlib_resnet" and model["input_size"] == [150, 150, 3]
    assert model["clip"]["mode"] == "norm" and len(model["labels"]) == 40
    w = client.get(f"/v1/models/{orl_model['model_id']}/weights")
    assert w.status_code == 200 and len(w.content) > 100_000
    acc = accuracy(client, test, orl_model["model_id"])
    print(f"accuracy on the 120 unseen ORL images (Redis path): {acc:.3f}")
    assert acc >= 0.98  # issue 16's bar for the default job


def test_facegrad_up_on_embedded_defaults(tmp_path, orl):
    """`facegrad up` with no broker URL: SQLite state, SQLite broker, local folder. Ten of
    ORL's people: the path is under test here, the default job's accuracy in the test above."""
    people = sorted(orl[0])[:10]
    train, test = ({p: split[p] for p in people} for split in orl)
    port = free_port()
    env = {k: v for k, v in __import__("os").environ.items()
           if not k.startswith("FACEGRAD_")}
    env.update(FACEGRAD_DATA_DIR=str(tmp_path / "data"), PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "facegrad.cli", "up", "--port",
                             str(port)],
                            cwd=ROOT, env=env, stdout=open(tmp_path / "up.log", "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            end = time.time() + 60
            while time.time() < end:
                try:
                    if c.get("/readyz").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.3)
            assert c.get("/readyz").status_code == 200, (tmp_path / "up.log").read_text()[-3000:]
            ds = upload(c, train, "orl-embedded")
            # the pretrained network as it is (epochs 0): this test is about the embedded path
            r = c.post("/v1/jobs", json={"dataset_id": ds["id"], "epochs": 0})
            assert r.status_code == 202, r.text
            assert r.headers["Location"] == f"/v1/jobs/{r.json()['id']}"
            job = wait_job(c, r.json()["id"], timeout=900)
            assert job["status"] == "succeeded", (job, (tmp_path / "up.log").read_text()[-3000:])
            acc = accuracy(c, test, job["model_id"])
            print(f"accuracy on the 30 unseen ORL images (embedded path): {acc:.3f}")
            assert acc >= 0.90
            assert (tmp_path / "data" / "facegrad.service.db").exists()
            assert (tmp_path / "data" / "broker.db").exists()
    finally:
        import os
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
