"""Shared fixtures: real redis-server, API and worker processes, a model trained on ORL."""

from __future__ import annotations

import pytest

from tests.harness import ORL, RedisServer, Service, free_port, orl_split, upload, wait_job


def pytest_collection_modifyitems(config, items):
    if not ORL.is_dir():
        skip = pytest.mark.skip(reason=f"shared face data not found at {ORL}")
        for item in items:
            if "orl" in item.fixturenames or "orl_model" in item.fixturenames:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    r = RedisServer(tmp_path_factory.mktemp("redis"))
    r.start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def service(tmp_path_factory, redis_server):
    """API + one worker on the private Redis; shared by the API tests. The worker serves its
    Prometheus metrics on ``service.env["FACEGRAD_WORKER_METRICS_PORT"]``."""
    s = Service(tmp_path_factory.mktemp("svc"), redis_server.url,
                FACEGRAD_WORKER_METRICS_PORT=free_port())
    s.start_api()
    s.start_worker()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(service):
    with service.client() as c:
        yield c


@pytest.fixture(scope="session")
def orl():
    return orl_split()


@pytest.fixture(scope="session")
def orl_model(client, orl):
    """A default model trained through the service on ORL without 3 images per subject."""
    train, _ = orl
    ds = upload(client, train, "orl-train")
    r = client.post("/v1/jobs", json={"dataset_id": ds["id"],
                                      "clip": {"mode": "norm", "max_norm": 5.0}})
    assert r.status_code == 202, r.text
    job = wait_job(client, r.json()["id"], timeout=900)
    assert job["status"] == "succeeded", job
    return {"dataset": ds, "job": job, "model_id": job["model_id"]}
