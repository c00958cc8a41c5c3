"""Observability: /metrics of the API, the worker's metrics port, and job ids on log lines."""

from __future__ import annotations

import io
import json
import logging

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from facegrad.service.logging_setup import job_id_var, setup_logging
from tests.harness import upload, wait_job


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    r = httpx.get(url, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.fixture(scope="module")
def tiny(client, service, orl):
    """A scrape, then a 5-identity model trained in seconds (2 epochs, 32 px)."""
    before = scrape(service.url + "/metrics")
    train, test = orl
    labels = sorted(train)[:5]
    ds = upload(client, {k: train[k] for k in labels}, "metrics-5")
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"], "architecture": "facenet_s",
                                      "epochs": 2, "image_size": 32,
                                      "batch_size": 8, "clip": {"mode": "value",
                                                                "clip_value": 1.0}})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout=300)
    assert job["status"] == "succeeded", (job, service.tail("worker1.log"))
    return {"before": before, "job": job, "test": {k: test[k] for k in labels}}


def test_api_metrics_move(client, service, tiny):
    paths = [ps[0] for ps in tiny["test"].values()][:2]
    mid = scrape(service.url + "/metrics")
    r = client.post("/v1/identify", files=[("file", (p.name, p.read_bytes())) for p in paths],
                    data={"model_id": tiny["job"]["model_id"]})
    assert r.status_code == 200, r.text
    after = scrape(service.url + "/metrics")
    before = tiny["before"]

    # identify latency and the micro-batcher's batch sizes
    count = "facegrad_identify_latency_seconds_count"
    assert value(after, count, endpoint="identify") == value(mid, count, endpoint="identify") + 1
    assert value(after, "facegrad_identify_latency_seconds_sum", endpoint="identify") > \
        value(mid, "facegrad_identify_latency_seconds_sum", endpoint="identify")
    assert value(after, "facegrad_identify_batch_faces_count") >= \
        value(mid, "facegrad_identify_batch_faces_count") + 1
    assert value(after, "facegrad_identify_batch_faces_sum") >= \
        value(mid, "facegrad_identify_batch_faces_sum") + 2  # two images, one face each
    assert value(after, "facegrad_identify_batch_requests_count") > \
        value(mid, "facegrad_identify_batch_requests_count")
    assert value(after, "facegrad_identify_batch_seconds_count") > \
        value(mid, "facegrad_identify_batch_seconds_count")
    hits = "facegrad_http_requests_total"
    assert value(after, hits, method="POST", route="/v1/identify", status="200") == \
        value(mid, hits, method="POST", route="/v1/identify", status="200") + 1
    assert value(after, hits, method="GET", route="/v1/jobs/{job_id}", status="200") > 0

    # read from the database and the broker at scrape time
    assert value(after, "facegrad_database_up") == 1
    for status in ("queued", "running", "succeeded", "failed", "cancelled"):
        assert ("facegrad_jobs", (("status", status),)) in after
    assert value(after, "facegrad_jobs", status="succeeded") >= \
        value(before, "facegrad_jobs", status="succeeded") + 1
    assert value(after, "facegrad_models") >= value(before, "facegrad_models") + 1
    assert value(after, "facegrad_datasets") >= value(before, "facegrad_datasets") + 1
    assert ("facegrad_queue_depth", (("source", "redis"),)) in after  # the tests' Redis
    assert value(after, "facegrad_queue_depth", source="redis") >= 0


def test_worker_metrics(service, tiny):
    port = service.env["FACEGRAD_WORKER_METRICS_PORT"]
    w = scrape(f"http://127.0.0.1:{port}/metrics")
    assert value(w, "facegrad_train_step_seconds_count", architecture="facenet_s") >= 2
    assert value(w, "facegrad_train_step_seconds_sum", architecture="facenet_s") > 0
    assert value(w, "facegrad_train_epoch_seconds_count", architecture="facenet_s") >= 2
    assert value(w, "facegrad_train_epochs_total", architecture="facenet_s") >= 2
    assert value(w, "facegrad_train_steps_total", clip_mode="value") >= 2
    assert value(w, "facegrad_worker_jobs_total", status="succeeded") >= 1
    assert value(w, "facegrad_worker_busy") in (0, 1)
    # the same epoch times are in the job's history
    hist = httpx.get(f"{service.url}/v1/jobs/{tiny['job']['id']}/metrics").json()["history"]
    assert all(h["epoch_seconds"] > 0 for h in hist)


def test_worker_log_lines_carry_the_job_id(service, tiny):
    job_id = tiny["job"]["id"]
    log = service.tail("worker1.log", 5_000_000)
    lines = [ln for ln in log.splitlines() if f"[job {job_id}]" in ln]
    assert any("epoch 1/2" in ln for ln in lines), log[-3000:]
    assert any("succeeded" in ln for ln in lines), log[-3000:]


def test_json_log_lines_carry_the_job_id():
    """FACEGRAD_LOG_JSON: one object a line, job_id from the context (also in other threads
    that copied it, as the lease heartbeat does)."""
    import contextvars
    import threading

    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    buf = io.StringIO()
    try:
        setup_logging(as_json=True)
        root.handlers[0].setStream(buf)
        log = logging.getLogger("facegrad.service.jobs")
        token = job_id_var.set("job-123")
        try:
            log.info("epoch %d done", 1)
            ctx = contextvars.copy_context()
            t = threading.Thread(target=ctx.run, args=(log.warning, "from the heartbeat"))
            t.start()
            t.join()
        finally:
            job_id_var.reset(token)
        log.info("outside a job")
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
    docs = [json.loads(line) for line in buf.getvalue().splitlines()]
    assert docs[0]["msg"] == "epoch 1 done" and docs[0]["job_id"] == "job-123"
    assert docs[0]["logger"] == "facegrad.service.jobs" and docs[0]["level"] == "INFO"
    assert docs[1]["job_id"] == "job-123"
    assert "job_id" not in docs[2]
