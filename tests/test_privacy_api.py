"""Private training through the API, on the real service (Redis, a Celery worker): a sweep of
DP-SGD jobs protecting people and photos, the guarantee on the job, the model and the
leaderboard, and refusals that say why."""

from __future__ import annotations

import re

import pytest
import torch

from tests.harness import wait_job, wait_status

PRIVATE = {"architecture": "dlib_resnet", "epochs": 1, "batch_size": 24,
           "clip": {"mode": "per_example", "max_norm": 1.0}}


@pytest.fixture(scope="module")
def private_sweep(client, orl_model):
    r = client.post("/v1/sweeps", json={
        "name": "private", "metric": "val_acc",
        "base": PRIVATE | {"dataset_id": orl_model["dataset"]["id"]},
        "grid": {"privacy": [{"target_epsilon": 8, "delta": 1e-4, "unit": "person"},
                             {"target_epsilon": 8, "delta": 1e-4, "unit": "image"}]}})
    assert r.status_code == 202, r.text
    sweep = wait_status(client, f"/v1/sweeps/{r.json()['id']}",
                        ("succeeded", "failed", "partial", "cancelled"), timeout=1200)
    return sweep


def test_private_jobs_report_their_guarantee(client, private_sweep):
    jobs = [wait_job(client, j) for j in private_sweep["job_ids"]]
    for job in jobs:
        assert job["status"] == "succeeded", job
        unit = job["config"]["privacy"]["unit"]
        rec = job["metrics"]["privacy"]
        assert rec["unit"] == unit and rec["accountant"] == "prv" and rec["delta"] == 1e-4
        assert 0 < rec["epsilon"] <= 8.0 and job["metrics"]["epsilon"] == rec["epsilon"]
        assert rec["noise_multiplier"] > 0 and 0 < rec["sample_rate"] < 1
        assert rec["steps_done"] == rec["steps"] > 0
        # ORL without 3 photos each, 20 % of its 40 people held out: 32 people, 224 photos
        assert rec["units"] == (32 if unit == "person" else rec["images"])
        examples = job["clipping"]["examples"]
        assert examples["count"] > 0 and 0 <= examples["clip_fraction"] <= 1
        hist = client.get(f"/v1/jobs/{job['id']}/metrics").json()["history"]
        assert hist[-1]["epsilon"] == pytest.approx(rec["epsilon"])
        model = client.get(f"/v1/models/{job['model_id']}").json()
        assert model["privacy"]["epsilon"] == rec["epsilon"]
        assert "gallery" in model["privacy"]["covers"]
        assert job["config"]["freeze_stages"] == 5  # the private default
        assert rec["expected_batch_size"] == rec["images"] // 4  # a quarter, under 256


def test_leaderboard_shows_epsilon(client, private_sweep):
    board = client.get(f"/v1/sweeps/{private_sweep['id']}/leaderboard").json()
    assert len(board["rows"]) == 2
    for row in board["rows"]:
        assert 0 < row["metrics"]["epsilon"]["mean"] <= 8.0
    by_eps = client.get(f"/v1/sweeps/{private_sweep['id']}/leaderboard",
                        params={"metric": "epsilon"}).json()
    assert by_eps["direction"] == "min"
    csv = client.get(f"/v1/sweeps/{private_sweep['id']}/leaderboard.csv").text
    assert "epsilon_mean" in csv.splitlines()[0]


@pytest.mark.parametrize("change,reason", [
    ({"clip": {"mode": "norm", "max_norm": 5.0}}, "needs clip mode 'per_example'"),
    ({"architecture": "facenet_s", "image_size": 64}, "[Bb]atch norm"),
    ({"devices": 2}, "one device"),
    ({"privacy": {"target_epsilon": 8, "expected_batch_size": 4000}}, "not smaller than the"),
    ({"privacy": {"target_epsilon": 8, "delta": 0.009, "unit": "image"}}, "not below 1 /"),
])
def test_a_void_guarantee_is_a_422_that_says_why(client, orl_model, change, reason):
    body = PRIVATE | {"dataset_id": orl_model["dataset"]["id"],
                      "privacy": {"target_epsilon": 8, "delta": 1e-5}} | change
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert re.search(reason, r.text), r.text


def test_the_network_downloads_without_the_gallery(client, private_sweep):
    """What a private model's guarantee covers can be shared alone: the network, not the
    gallery of enrolled descriptors nor the head's per-person rows."""
    from safetensors.torch import load

    job = wait_job(client, private_sweep["job_ids"][0])
    whole = load(client.get(f"/v1/models/{job['model_id']}/weights").content)
    r = client.get(f"/v1/models/{job['model_id']}/weights", params={"part": "network"})
    assert r.status_code == 200 and "network.safetensors" in r.headers["content-disposition"]
    network = load(r.content)
    assert any(k.startswith("gallery.") for k in whole)
    assert any(k.startswith("model.classifier.") for k in whole)
    assert set(network) == {k for k in whole if k.startswith("model.backbone.")}
    for k, v in network.items():
        assert torch.equal(v, whole[k])  # the same bytes, read back
    bad = client.get(f"/v1/models/{job['model_id']}/weights", params={"part": "gallery"})
    assert bad.status_code == 422
