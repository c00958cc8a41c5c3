"""The production files say what the README promises (no Docker engine runs here to build them)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
import yaml

from tests.harness import ROOT


def test_image_runs_as_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must end as a non-root user"
    assert re.search(r"useradd .*--uid 10001 facegrad", text)


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_has_postgres_with_a_volume_and_a_healthcheck():
    pg = compose()["services"]["postgres"]
    assert re.fullmatch(r"postgres:\d+(-\w+)?", pg["image"]), "pin the major version"
    assert any(v.split(":")[1] == "/var/lib/postgresql/data" for v in pg["volumes"])
    assert pg["volumes"][0].split(":")[0] in compose()["volumes"]  # named, so it outlives
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    env = pg["environment"]
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert env[key].startswith(f"${{{key}:-"), f"{key} comes from the environment"


def test_redis_keeps_an_append_only_file():
    redis = compose()["services"]["redis"]
    cmd = redis["command"]
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--appendfsync") + 1] == "everysec"
    assert any(v.endswith(":/data") for v in redis["volumes"])
    assert "redis-cli" in redis["healthcheck"]["test"]


def test_api_and_workers_use_postgres_redis_and_the_shared_data_volume():
    doc = compose()
    services = doc["services"]
    assert {"postgres", "redis", "api", "worker"} <= set(services)
    for name in ("api", "worker"):
        svc = services[name]
        env = svc["environment"]
        assert env["FACEGRAD_DATABASE_URL"].startswith("postgresql+psycopg2://")
        assert "@postgres:5432/" in env["FACEGRAD_DATABASE_URL"]
        assert env["FACEGRAD_BROKER_URL"].startswith("redis://redis:6379")
        assert env["FACEGRAD_DATA_DIR"] == "/data"
        assert "data:/data" in svc["volumes"]
        for dep in ("postgres", "redis"):
            assert svc["depends_on"][dep]["condition"] == "service_healthy"
    assert "data" in doc["volumes"]
    assert services["api"]["command"][:2] == ["facegrad", "serve"]


def test_the_worker_scales():
    worker = compose()["services"]["worker"]
    assert worker["command"] == ["facegrad", "worker"]
    # a fixed name or a published host port would stop a second replica from starting
    assert "container_name" not in worker and "ports" not in worker
    gpu = worker["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["capabilities"] == ["gpu"] and gpu["driver"] == "nvidia"
    assert re.fullmatch(r"\$\{FACEGRAD_WORKER_GPUS:-(all|\d+)\}", str(gpu["count"]))
    assert worker["healthcheck"] == {"disable": True}  # the image's check polls the API


def test_image_installs_the_postgres_driver():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r'pip install .*"\.\[[^\]]*postgres[^\]]*\]"', text)
    # the extra itself (pyproject.toml's [project.optional-dependencies]; Python 3.10 has no
    # tomllib to read it with)
    assert re.search(r'^postgres\s*=\s*\[\s*"psycopg2', (ROOT / "pyproject.toml").read_text(), re.M)


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.skipif(_compose_command() is None, reason="no docker compose on this machine")
def test_compose_validates_the_file(tmp_path):
    """Compose's own schema and interpolation (no engine needed), with the defaults and with the
    variables a deployment sets."""
    for extra in ({}, {"FACEGRAD_WORKER_GPUS": "2", "POSTGRES_PASSWORD": "s3cret"}):
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("FACEGRAD_", "POSTGRES_"))}
        r = subprocess.run([*_compose_command(), "-f", str(ROOT / "docker-compose.yml"),
                            "config"], capture_output=True, text=True, cwd=tmp_path,
                           env=dict(env, **extra))
        assert r.returncode == 0, r.stderr
        worker = yaml.safe_load(r.stdout)["services"]["worker"]
        count = worker["deploy"]["resources"]["reservations"]["devices"][0]["count"]
        assert str(count) == extra.get("FACEGRAD_WORKER_GPUS", "all")
        url = worker["environment"]["FACEGRAD_DATABASE_URL"]
        assert url.endswith(f":{extra.get('POSTGRES_PASSWORD', 'facegrad-local-only')}"
                            "@postgres:5432/facegrad")
