"""The production files say what the README promises (no Docker engine runs here to build them)."""

from __future__ import annotations

import re

import yaml

from tests.harness import ROOT


def test_image_runs_as_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    assert re.search(r"useradd .*--uid 10001 facegrad", text)


def test_compose_has_redis_api_and_gpu_worker_sharing_data():
    doc = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = doc["services"]
    assert {"redis", "api", "worker"} <= set(services)
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["FACEGRAD_BROKER_URL"].startswith("redis://redis:6379")
        assert "data:/data" in services[name]["volumes"]
    assert services["worker"]["command"] == ["facegrad", "worker"]
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"]
