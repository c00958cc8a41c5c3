"""Faults injected for real: killed workers, a broker outage, an API restart, cancellation."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.harness import (
    RedisServer,
    Service,
    orl_folder,
    rank_processes,
    upload,
    wait_job,
)

JOB = {"architecture": "seed_cnn", "image_size": 32, "batch_size": 16,
       "optimizer": {"name": "sgd", "momentum": 0.9}, "learning_rate": 0.01,
       "clip": {"mode": "norm", "max_norm": 5.0, "scope": "per_tensor"}}


@pytest.fixture(scope="module")
def redis_own(tmp_path_factory):
    r = RedisServer(tmp_path_factory.mktemp("redis-faults"))
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def svc(tmp_path_factory, redis_own):
    s = Service(tmp_path_factory.mktemp("faults"), redis_own.url)
    s.start_api()
    s.start_worker()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def c(svc):
    with svc.client() as client:
        yield client


@pytest.fixture(scope="module")
def small_dataset(c):
    folder = dict(list(orl_folder().items())[:10])
    return upload(c, folder, "faults")


def post_job(c, dataset, **kw) -> dict:
    r = c.post("/v1/jobs", json={"dataset_id": dataset["id"], **JOB, **kw})
    assert r.status_code == 202, r.text
    return r.json()


def wait_for(pred, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_worker_killed_mid_training_resumes_from_checkpoint(svc, c, small_dataset):
    job = post_job(c, small_dataset, epochs=40)
    victim = svc.workers[-1]

    def checkpointed():
        j = c.get(f"/v1/jobs/{job['id']}").json()
        return j if j["status"] == "running" and len(j["checkpoints"]) >= 3 else None

    before = wait_for(checkpointed, 300, "three checkpoints")
    svc.kill(victim)  # SIGKILL the worker's whole process group, mid-epoch
    svc.start_worker()
    done = wait_job(c, job["id"], timeout=600)
    assert done["status"] == "succeeded", (done, svc.tail("worker2.log"))
    assert done["attempts"] >= 2
    assert done["resumed_from_epoch"] is not None
    assert done["resumed_from_epoch"] >= len(before["checkpoints"]) >= 3
    assert done["model_id"]
    hist = c.get(f"/v1/jobs/{job['id']}/metrics").json()["history"]
    assert [h["epoch"] for h in hist] == list(range(1, 41))


def test_broker_outage_refuses_new_jobs_and_loses_none(svc, c, small_dataset, redis_own):
    running = post_job(c, small_dataset, epochs=30)
    wait_for(lambda: c.get(f"/v1/jobs/{running['id']}").json()["status"] == "running", 120,
             "the first job to run")
    queued = post_job(c, small_dataset, epochs=3)  # waits behind the running one
    redis_own.stop()
    t = time.time()
    r = c.post("/v1/jobs", json={"dataset_id": small_dataset["id"], **JOB, "epochs": 1})
    assert r.status_code == 503 and "broker" in r.json()["detail"]
    assert time.time() - t < 15, "the API must answer quickly while the broker is down"
    ready = c.get("/readyz")
    assert ready.status_code == 503 and "broker" in ready.json()["detail"]
    assert c.get("/healthz").status_code == 200
    time.sleep(3)
    redis_own.start()  # an empty Redis: the queued job's message is gone
    wait_for(lambda: c.get("/readyz").status_code == 200, 30, "readiness after the outage")
    for job in (running, queued):
        done = wait_job(c, job["id"], timeout=600)
        assert done["status"] == "succeeded", (done, svc.tail("api.log"), svc.tail("worker1.log"))


def test_api_restart_while_a_job_runs(svc, c, small_dataset):
    job = post_job(c, small_dataset, epochs=25)
    wait_for(lambda: c.get(f"/v1/jobs/{job['id']}").json()["status"] == "running", 120,
             "the job to run")
    svc.stop_api()
    with pytest.raises(httpx.HTTPError):
        c.get("/healthz")
    svc.start_api()
    done = wait_job(c, job["id"], timeout=600)
    assert done["status"] == "succeeded"


def test_cancel_running_twice_and_finished(svc, c, small_dataset):
    job = post_job(c, small_dataset, epochs=200)
    wait_for(lambda: len(c.get(f"/v1/jobs/{job['id']}").json()["checkpoints"]) >= 1, 120,
             "a checkpoint")
    r1 = c.post(f"/v1/jobs/{job['id']}/cancel")
    assert r1.status_code == 200 and r1.json()["cancel_requested"] is True
    r2 = c.post(f"/v1/jobs/{job['id']}/cancel")
    assert r2.status_code == 200
    done = wait_job(c, job["id"], timeout=60)
    assert done["status"] == "cancelled" and done["checkpoints"]
    assert done["progress"]["epoch"] < 200
    assert c.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelled"

    finished = wait_job(c, post_job(c, small_dataset, epochs=1)["id"], timeout=120)
    assert finished["status"] == "succeeded"
    r = c.post(f"/v1/jobs/{finished['id']}/cancel")
    assert r.status_code == 409 and "succeeded" in r.json()["detail"]


def test_cancel_queued_job_never_runs(svc, c, small_dataset):
    blocker = post_job(c, small_dataset, epochs=200)
    queued = post_job(c, small_dataset, epochs=2)
    r = c.post(f"/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    c.post(f"/v1/jobs/{blocker['id']}/cancel")
    wait_job(c, blocker["id"], timeout=120)
    time.sleep(2)
    j = c.get(f"/v1/jobs/{queued['id']}").json()
    assert j["status"] == "cancelled" and j["attempts"] == 0 and j["started_at"] is None


def test_dataset_in_use_cannot_be_deleted(svc, c, small_dataset):
    job = post_job(c, small_dataset, epochs=200)
    r = c.delete(f"/v1/datasets/{small_dataset['id']}")
    assert r.status_code == 409 and "job" in r.json()["detail"]
    c.post(f"/v1/jobs/{job['id']}/cancel")
    wait_job(c, job["id"], timeout=120)


def test_diverging_job_fails_with_a_clear_message(svc, c, small_dataset):
    job = post_job(c, small_dataset, epochs=5, learning_rate=10.0, lr_schedule="constant",
                   optimizer={"name": "sgd", "momentum": 0.0},
                   clip={"mode": "none", "on_nonfinite": "fail"})
    done = wait_job(c, job["id"], timeout=120)
    assert done["status"] == "failed"
    assert "non-finite" in done["error"] and "step" in done["error"]


def test_a_dead_rank_fails_the_attempt_and_the_job_is_retried(svc, c, small_dataset):
    """A 2-process job (gloo on the CPU) whose second process is killed: the attempt fails at
    once, the job goes back to the queue, and the next attempt resumes from the checkpoint."""
    job = post_job(c, small_dataset, epochs=12, devices=2)

    def checkpointed():
        j = c.get(f"/v1/jobs/{job['id']}").json()
        assert j["status"] in ("queued", "running"), (j, svc.tail("worker1.log"))
        return j if j["status"] == "running" and len(j["checkpoints"]) >= 2 else None

    wait_for(checkpointed, 300, "two checkpoints of the 2-process job")
    ranks = wait_for(rank_processes, 30, "the job's second process")
    os.kill(ranks[0], signal.SIGKILL)
    done = wait_job(c, job["id"], timeout=600)
    assert done["status"] == "succeeded", (done, svc.tail("worker1.log"))
    assert done["attempts"] == 2
    assert done["resumed_from_epoch"] >= 2
    assert done["error"] is None
    assert "rank 1 exited (SIGKILL)" in done["info"]["earlier_attempt"]
    hist = c.get(f"/v1/jobs/{job['id']}/metrics").json()["history"]
    assert [h["epoch"] for h in hist] == list(range(1, 13))
