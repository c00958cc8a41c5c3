"""Property-based fuzzing of the running API from its own /openapi.json (schemathesis v4).

Every operation gets valid and invalid inputs (positive and negative generation); the server must
never answer 5xx, every answer must match the response schema it documents, and invalid input must
be refused with a 4xx. Bounded: at most MAX_EXAMPLES inputs per operation and mode, no shrinking,
so the whole file runs in about a minute.

Jobs are safe to fuzz: a generated dataset_id is a random UUID, so POST /v1/jobs answers 404 in
milliseconds and never queues training. Ids in paths are random UUIDs too (404), so nothing the
other tests made is deleted.

The operations are listed at collection time from the app's OpenAPI document built in-process
(no server needed) and each one is fuzzed against the live server's own /openapi.json. (The
``schemathesis.pytest.from_fixture`` loader is not used: with pytest 9 it fails on
``request.node._nodeid``.)
"""

from __future__ import annotations

import io
import time
from urllib.parse import quote

import httpx
import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
)

from tests.harness import post_dataset

MAX_EXAMPLES = 15
CHECKS = [not_a_server_error, response_schema_conformance, content_type_conformance,
          negative_data_rejection]
# Operations that decode images: fuzzed again once a trained model exists.
IMAGE_OPERATIONS = [("POST", "/v1/identify"), ("POST", "/v1/verify"),
                    ("POST", "/v1/models/{model_id}/identities")]


def _operations() -> list[tuple[str, str]]:
    import tempfile

    from app.main import create_app
    from facegrad.service.settings import Settings

    with tempfile.TemporaryDirectory() as d:
        doc = create_app(Settings(data_dir=d, api_keys="", cors_origins=""),
                         reconcile=False).openapi()
    return [(method.upper(), path) for path, item in sorted(doc["paths"].items())
            for method in item if method in ("get", "post", "put", "patch", "delete")]


OPERATIONS = _operations()


def _fuzz(url: str, method: str, path: str, path_parameters: dict | None = None) -> int:
    """Run up to MAX_EXAMPLES positive and MAX_EXAMPLES negative cases; return how many ran."""
    schema = schemathesis.openapi.from_url(url + "/openapi.json")
    # The fuzzed server has no API keys: leaving out X-API-Key is not invalid there
    # (tests/test_auth.py covers the keys).
    schema.config.generation.update(with_security_parameters=False)
    op = schema[path][method]
    ran = 0
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        strategy = op.as_strategy(mode, path_parameters=path_parameters)

        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  phases=[Phase.explicit, Phase.generate],  # no shrinking: bounded time
                  suppress_health_check=list(HealthCheck))
        @given(case=strategy, _=st.just(None))
        def run(case, _):
            nonlocal ran
            ran += 1
            case.call_and_validate(base_url=url, checks=CHECKS, timeout=60)

        try:
            run()
        except Unsatisfiable:
            if mode is GenerationMode.POSITIVE:
                raise  # else: nothing to make invalid (no parameters, e.g. GET /healthz)
    return ran


@pytest.fixture(scope="module", autouse=True)
def log_start(service) -> int:
    """Where the API log stood before this module's requests."""
    p = service.workdir / "api.log"
    return p.stat().st_size if p.exists() else 0


@pytest.fixture(scope="module")
def a_dataset(service):
    """One small dataset, so that the list and read responses have rows to check against their
    schema (an empty list hides a bad field)."""
    buf = io.BytesIO()
    np.savez(buf, images=np.random.default_rng(0).integers(0, 255, (4, 32, 32), dtype=np.uint8),
             labels=np.array(["a", "b", "a", "b"]))
    with httpx.Client(base_url=service.url, timeout=60) as c:
        ds = post_dataset(c, "fuzz-seed.npz", buf.getvalue())
        yield ds
        c.delete(f"/v1/datasets/{ds['id']}")


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_api_fuzz(service, a_dataset, method, path):
    assert _fuzz(service.url, method, path) > 0


@pytest.mark.parametrize(("method", "path"), IMAGE_OPERATIONS,
                         ids=[f"{m} {p}" for m, p in IMAGE_OPERATIONS])
def test_image_operations_fuzz_with_model(service, orl_model, method, path):
    """Identify, verify and enrollment with a trained model present, so that generated input
    reaches the image decoding, the detector and the embedding (enrollment on the real model:
    a generated identity that is accepted is removed again)."""
    params = {"model_id": orl_model["model_id"]} if "{model_id}" in path else None
    before = _identities(service, orl_model["model_id"])
    try:
        assert _fuzz(service.url, method, path, params) > 0
    finally:
        with httpx.Client(base_url=service.url, timeout=60) as c:
            for name in set(_identities(service, orl_model["model_id"])) - set(before):
                # a generated name may hold '#', '?' or '/': percent-encoded, it is one segment
                c.delete(f"/v1/models/{orl_model['model_id']}/identities/{quote(name, safe='')}")
    assert _identities(service, orl_model["model_id"]) == before


def _identities(service, model_id: str) -> dict:
    r = httpx.get(f"{service.url}/v1/models/{model_id}/identities", timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["identities"]


def test_no_unhandled_errors_logged(service, log_start):
    """After the fuzzing above: the server is healthy and logged no 'unhandled error' (the line
    the 500 handler writes) and no traceback."""
    assert httpx.get(service.url + "/healthz", timeout=10).status_code == 200
    time.sleep(0.2)
    with open(service.workdir / "api.log", "rb") as f:
        f.seek(log_start)
        log = f.read().decode(errors="replace")
    assert "unhandled error" not in log and "Traceback" not in log, log[-5000:]
