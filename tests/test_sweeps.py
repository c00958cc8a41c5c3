"""Sweeps: grid expansion, leaderboard, CSV and status (units); the API in process (broker
outage, limits); and a real service with two workers running a sweep side by side."""

from __future__ import annotations

import csv
import io
import math
import statistics
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient

from facegrad.service import sweeps
from facegrad.service.sweeps import (
    SweepError,
    expand,
    leaderboard,
    setting_of,
    sweep_status,
    to_csv,
)
from tests.harness import ORL, Service, orl_split, upload, wait_job, wait_status

DS = "00000000-0000-0000-0000-000000000000"
BASE = {"dataset_id": DS, "architecture": "seed_cnn", "image_size": 32, "epochs": 5,
        "batch_size": 16}
NORM5 = {"mode": "norm", "max_norm": 5, "scope": "per_tensor"}
CLIPS = [{"mode": "none"}, NORM5, {"mode": "threshold", "alpha": 0.9}]


# --- expand ----------------------------------------------------------------------------------

def test_expand_product_in_grid_order():
    jobs = expand(BASE, {"clip": CLIPS, "seed": [0, 1]}, 64)
    assert len(jobs) == 6
    assert [(j["clip"]["mode"], j["seed"]) for j in jobs] == [
        ("none", 0), ("none", 1), ("norm", 0), ("norm", 1), ("threshold", 0), ("threshold", 1)]
    assert all(j["dataset_id"] == DS and j["epochs"] == 5 for j in jobs)
    jobs = expand(BASE, {"learning_rate": [0.1, 0.01], "optimizer": [
        {"name": "sgd", "momentum": 0.9}, {"name": "adamw"}], "architecture": ["seed_cnn"]}, 64)
    assert [(j["learning_rate"], j["optimizer"]["name"]) for j in jobs] == [
        (0.1, "sgd"), (0.1, "adamw"), (0.01, "sgd"), (0.01, "adamw")]


def test_expand_empty_grid_is_the_base():
    assert expand(BASE, {}, 1) == [BASE]


def test_expand_over_the_maximum_before_validation():
    # the values are invalid too: the count is what is reported, without validating 1000 bodies
    with pytest.raises(SweepError) as e:
        expand(BASE, {"seed": list(range(100)), "clip": [{"mode": "bogus"}] * 10}, 64)
    assert "1000 jobs" in str(e.value) and "at most 64" in str(e.value)
    assert "FACEGRAD_MAX_SWEEP_JOBS" in str(e.value) and e.value.status == 422
    assert isinstance(e.value, ValueError)


def test_expand_invalid_combination_is_named():
    grid = {"clip": [NORM5, {"mode": "norm", "max_norm": -1}], "seed": [0, 1]}
    with pytest.raises(SweepError) as e:
        expand(BASE, grid, 64)
    msg = str(e.value)
    assert msg.startswith("grid combination {'clip': {'mode': 'norm', 'max_norm': -1}, "
                          "'seed': 0}: ")
    assert "clip.norm.max_norm: Input should be greater than 0" in msg
    with pytest.raises(SweepError, match="epochs"):
        expand(BASE, {"epochs": [5, 0]}, 64)  # seed_cnn trains from scratch: epochs >= 1
    with pytest.raises(SweepError, match="no_such_field"):
        expand(BASE, {"no_such_field": [1]}, 64)


def test_expand_refuses_dataset_id_and_non_lists():
    with pytest.raises(SweepError, match="dataset_id"):
        expand(BASE, {"dataset_id": [DS]}, 64)
    for bad in (5, [], "abc", {"a": 1}):
        with pytest.raises(SweepError, match="grid key 'seed'"):
            expand(BASE, {"seed": bad}, 64)


def test_setting_of_leaves_out_seed():
    cfg = {"clip": NORM5, "seed": 3, "learning_rate": 0.1, "epochs": 5}
    assert setting_of(cfg, ["clip", "seed", "learning_rate"]) == {"clip": NORM5,
                                                                  "learning_rate": 0.1}


# --- leaderboard -----------------------------------------------------------------------------

T0 = datetime(2024, 1, 1, tzinfo=timezone.utc)


def job(clip, seed, status="succeeded", val_acc=None, history=(), seconds=10.0, **extra):
    return {"id": f"{clip['mode']}-{seed}", "status": status, "config": {"clip": clip,
                                                                         "seed": seed},
            "metrics": {"val_acc": val_acc, "val_loss": 1.0,
                        "open_set": {"known_named": 0.8, "strangers_rejected": 0.9,
                                     "tpir_at_fpir_0.05": 0.7}},
            "clipping": {"steps": 10, "clipped_steps": 5, "clip_fraction": 0.5,
                         "skipped_steps": 0, "grad_norm_pre": {"mean": 4.0, "max": 9.0},
                         "grad_norm_post": {"mean": 3.0}},
            "started_at": T0, "finished_at": T0 + timedelta(seconds=seconds),
            "history": list(history), **extra}


def test_leaderboard_means_sd_ranking_and_failed_runs():
    none, norm, thr = CLIPS
    jobs = [job(none, 0, val_acc=0.5), job(none, 1, val_acc=0.7),
            job(norm, 0, val_acc=0.9), job(norm, 1, val_acc=0.8, seconds=20),
            job(thr, 0, val_acc=0.95), job(thr, 1, status="failed", val_acc=0.0)]
    board = leaderboard(jobs, ["clip", "seed"], "val_acc")
    assert board["metric"] == "val_acc" and board["direction"] == "max"
    rows = board["rows"]
    assert [r["setting"]["clip"]["mode"] for r in rows] == ["threshold", "norm", "none"]
    thr_row, norm_row, none_row = rows
    assert thr_row["runs"] == 2 and thr_row["succeeded"] == 1 and thr_row["failed"] == 1
    assert thr_row["metrics"]["val_acc"] == {"mean": 0.95, "sd": 0.0, "n": 1}  # failed: nothing
    assert thr_row["job_ids"] == ["threshold-0", "threshold-1"]
    assert norm_row["metrics"]["val_acc"]["mean"] == pytest.approx(0.85)
    assert norm_row["metrics"]["val_acc"]["sd"] == pytest.approx(statistics.stdev([0.9, 0.8]))
    assert norm_row["metrics"]["wall_seconds"]["mean"] == pytest.approx(15.0)
    assert none_row["metrics"]["val_acc"]["sd"] == pytest.approx(math.sqrt(0.02))
    assert norm_row["label"] == "clip=norm:max_norm=5,scope=per_tensor"
    assert "seed" not in norm_row["setting"]
    for name in ("grad_norm_pre", "grad_norm_post", "clip_fraction", "known_named",
                 "strangers_rejected", "tpir_at_fpir_0.05", "skipped_steps"):
        assert norm_row["metrics"][name]["n"] == 2
    assert norm_row["metrics"]["grad_norm_pre"]["mean"] == 4.0

    # a "min" metric ranks the other way; rows without it come last
    board = leaderboard(jobs, ["clip", "seed"], "wall_seconds")
    assert board["direction"] == "min"
    assert [r["setting"]["clip"]["mode"] for r in board["rows"]] == ["none", "threshold", "norm"]
    jobs_all_failed = jobs[:4] + [job(thr, 0, status="failed"), job(thr, 1, status="running")]
    rows = leaderboard(jobs_all_failed, ["clip"], "val_acc")["rows"]
    assert rows[-1]["setting"]["clip"]["mode"] == "threshold"
    assert rows[-1]["metrics"]["val_acc"] == {"mean": None, "sd": None, "n": 0}
    assert rows[-1]["runs"] == 2 and rows[-1]["failed"] == 1 and rows[-1]["succeeded"] == 0
    with pytest.raises(SweepError, match="known metrics: val_acc"):
        leaderboard(jobs, ["clip"], "accuracy")


def test_leaderboard_history_metrics():
    hist = [{"epoch": 1, "val_acc": 0.2, "val_loss": 3.0}, {"epoch": 2, "val_acc": 0.6,
                                                           "val_loss": 1.5},
            {"epoch": 3, "val_acc": 0.95, "val_loss": 0.9}, {"epoch": 4, "val_acc": 1.0,
                                                            "val_loss": 1.1}]
    hist2 = [{"epoch": 1, "val_acc": 0.5, "val_loss": None},
             {"epoch": 2, "val_acc": 0.45, "val_loss": 2.0}]
    jobs = [job(NORM5, 0, val_acc=1.0, history=hist),
            job(NORM5, 1, val_acc=0.45, history=hist2)]
    row = leaderboard(jobs, ["clip", "seed"], "epochs_to_90pct")["rows"][0]
    # run 1: best 1.0, first epoch >= 0.9 is 3; run 2: best 0.5, 0.45 >= 0.45 but epoch 1 first
    assert row["metrics"]["epochs_to_90pct"]["mean"] == 2.0
    assert row["metrics"]["best_val_loss"]["mean"] == pytest.approx((0.9 + 2.0) / 2)
    assert row["metrics"]["final_val_loss"]["mean"] == 1.0
    assert set(row["metrics"]) == set(sweeps.METRICS)
    assert all(len(v) == 2 and v[1] in ("max", "min") for v in sweeps.METRICS.values())


def test_to_csv_header_and_rows():
    jobs = [job(c, s, val_acc=0.5 + 0.1 * i + 0.01 * s) for i, c in enumerate(CLIPS)
            for s in (0, 1)]
    board = leaderboard(jobs, ["clip", "seed"], "val_acc")
    rows = list(csv.reader(io.StringIO(to_csv(board))))
    assert rows[0][:4] == ["clip", "runs", "succeeded", "failed"]
    assert rows[0][4:6] == ["val_acc_mean", "val_acc_sd"]
    assert len(rows[0]) == 4 + 2 * len(sweeps.METRICS)
    assert len(rows) == 4
    assert [r[0] for r in rows[1:]] == ["threshold:alpha=0.9", "norm:max_norm=5,scope=per_tensor",
                                        "none"]
    assert rows[1][1:4] == ["2", "2", "0"]
    assert float(rows[1][4]) == pytest.approx(0.705)


def test_sweep_status():
    assert sweep_status(["queued", "queued"], False) == "queued"
    assert sweep_status(["queued", "running"], False) == "running"
    assert sweep_status(["succeeded", "queued"], False) == "running"
    assert sweep_status(["cancelled", "running"], True) == "running"
    assert sweep_status(["succeeded", "succeeded"], False) == "succeeded"
    assert sweep_status(["succeeded", "succeeded"], True) == "succeeded"
    assert sweep_status(["succeeded", "cancelled"], True) == "cancelled"
    assert sweep_status(["failed", "cancelled"], True) == "cancelled"
    assert sweep_status(["failed", "failed"], False) == "failed"
    assert sweep_status(["failed", "cancelled"], False) == "failed"
    assert sweep_status(["failed", "succeeded"], False) == "partial"


# --- the API in process: the broker faked ----------------------------------------------------

@pytest.fixture()
def inproc(tmp_path, monkeypatch):
    from app.main import create_app
    from app.routes import jobs as jobs_route
    from facegrad.service.db import Dataset, session_scope
    from facegrad.service.settings import Settings

    settings = Settings(data_dir=tmp_path, api_keys="", cors_origins="", max_sweep_jobs=8)
    sent: list[str] = []
    state = {"fail_after": None}

    def publish(job_id):
        if state["fail_after"] is not None and len(sent) >= state["fail_after"]:
            raise jobs_route.BrokerUnavailable("the job broker does not answer (test)")
        sent.append(job_id)

    monkeypatch.setattr(jobs_route, "publish_job", publish)
    with TestClient(create_app(settings, reconcile=False)) as c:
        with session_scope(settings.db_url) as s:
            s.add(Dataset(id=DS, name="fake", num_images=10, num_identities=2, identities={},
                          rejected={}, source_format="zip"))
        yield c, sent, state


def totals(c) -> tuple[int, int]:
    return c.get("/v1/sweeps").json()["total"], c.get("/v1/jobs").json()["total"]


def test_api_broker_down_leaves_nothing(inproc):
    c, sent, state = inproc
    state["fail_after"] = 2  # the third job's message fails
    r = c.post("/v1/sweeps", json={"name": "s", "base": BASE, "grid": {"seed": [0, 1, 2, 3]}})
    assert r.status_code == 503 and "broker" in r.json()["detail"]
    assert "sweep was not accepted" in r.json()["detail"]
    assert totals(c) == (0, 0)
    r = c.post("/v1/jobs", json=BASE)  # the shared path: the same answer for one job
    assert r.status_code == 503 and "job was not accepted" in r.json()["detail"]
    assert totals(c) == (0, 0)


def test_api_in_process(inproc):
    c, sent, _ = inproc
    r = c.post("/v1/sweeps", json={"name": "clips", "base": BASE,
                                   "grid": {"clip": CLIPS, "seed": [0, 1]}})
    assert r.status_code == 202, r.text
    sw = r.json()
    assert r.headers["location"] == f"/v1/sweeps/{sw['id']}"
    assert sw["status"] == "queued" and len(sw["job_ids"]) == 6 and sent == sw["job_ids"]
    assert sw["progress"] == {"jobs": 6, "queued": 6, "running": 0, "succeeded": 0,
                              "failed": 0, "cancelled": 0, "fraction": 0.0}
    assert sw["metric"] == "val_acc" and sw["grid"]["seed"] == [0, 1]
    job = c.get(f"/v1/jobs/{sw['job_ids'][2]}").json()
    assert job["config"]["clip"]["mode"] == "norm" and job["config"]["seed"] == 0
    assert job["config"]["epochs"] == 5 and job["config"]["image_size"] == 32

    for grid, words in (({"seed": list(range(9))}, ["9 jobs", "at most 8"]),
                        ({"clip": [{"mode": "norm", "max_norm": -1}]}, ["grid combination",
                                                                        "max_norm"]),
                        ({"dataset_id": [DS]}, ["dataset_id"]),
                        ({"seed": 3}, ["grid key 'seed'"])):
        r = c.post("/v1/sweeps", json={"name": "bad", "base": BASE, "grid": grid})
        assert r.status_code == 422, r.text
        assert all(w in r.json()["detail"] for w in words), r.json()
    r = c.post("/v1/sweeps", json={"name": "bad", "base": {"epochs": 3}, "grid": {}})
    assert r.status_code == 422 and "dataset_id" in r.json()["detail"]
    r = c.post("/v1/sweeps", json={"name": "", "base": BASE, "grid": {}})
    assert r.status_code == 422
    r = c.post("/v1/sweeps", json={"name": "x", "base": BASE, "grid": {}, "metric": "nope"})
    assert r.status_code == 422
    r = c.post("/v1/sweeps", json={"name": "x", "base": {**BASE, "dataset_id": DS[:-1] + "1"},
                                   "grid": {}})
    assert r.status_code == 404 and "dataset" in r.json()["detail"]
    assert totals(c) == (1, 6) and len(sent) == 6

    r = c.post("/v1/sweeps", json={"name": "base only", "base": BASE, "grid": {},
                                   "metric": "wall_seconds"})
    assert r.status_code == 202 and len(r.json()["job_ids"]) == 1
    listed = c.get("/v1/sweeps", params={"limit": 1}).json()
    assert listed["total"] == 2 and [s["name"] for s in listed["items"]] == ["base only"]
    assert c.get("/v1/sweeps", params={"offset": 1}).json()["items"][0]["id"] == sw["id"]
    assert c.get(f"/v1/sweeps/{DS}").status_code == 404

    board = c.get(f"/v1/sweeps/{sw['id']}/leaderboard").json()
    assert board["metric"] == "val_acc" and len(board["rows"]) == 3
    assert all(r["runs"] == 2 and r["succeeded"] == 0 for r in board["rows"])
    assert set(board["metrics"]) == set(sweeps.METRICS)
    r = c.get(f"/v1/sweeps/{sw['id']}/leaderboard", params={"metric": "accuracy"})
    assert r.status_code == 422 and "val_acc" in r.json()["detail"]
    r = c.get(f"/v1/sweeps/{sw['id']}/leaderboard", params={"format": "csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    assert len(r.text.strip().splitlines()) == 4

    # one job ended already (as a worker leaves it), the rest queued: a cancel ends those at
    # once and leaves the succeeded one; again: 200, nothing changes
    from facegrad.service.db import Job, session_scope
    with session_scope(c.app.state.settings.db_url) as s:
        done = s.get(Job, sw["job_ids"][0])
        done.status, done.finished_at = "succeeded", datetime.now(timezone.utc)
    r = c.post(f"/v1/sweeps/{sw['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert r.json()["progress"]["cancelled"] == 5 and r.json()["finished_at"]
    assert r.json()["progress"]["succeeded"] == 1
    r2 = c.post(f"/v1/sweeps/{sw['id']}/cancel")
    assert r2.status_code == 200 and r2.json()["finished_at"] == r.json()["finished_at"]
    assert [c.get(f"/v1/jobs/{j}").json()["status"] for j in sw["job_ids"]] == [
        "succeeded"] + ["cancelled"] * 5


# --- a real service with two workers ---------------------------------------------------------

@pytest.fixture(scope="module")
def svc2(tmp_path_factory, redis_server):
    # a Redis database of its own: the session service's worker must not take these jobs
    broker = redis_server.url.rsplit("/", 1)[0] + "/3"
    s = Service(tmp_path_factory.mktemp("sweeps"), broker, FACEGRAD_MAX_SWEEP_JOBS=8)
    s.start_api()
    s.start_worker()
    s.start_worker()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def c2(svc2):
    with svc2.client() as c:
        yield c


@pytest.fixture(scope="module")
def six(c2):
    if not ORL.is_dir():
        pytest.skip(f"shared face data not found at {ORL}")
    train, _ = orl_split()
    return upload(c2, dict(list(train.items())[:6]), "six")


def parse(t: str) -> datetime:
    return datetime.fromisoformat(t.replace("Z", "+00:00"))


def wait_sweep(c, sweep_id, timeout, until=("succeeded", "failed", "cancelled", "partial")):
    return wait_status(c, f"/v1/sweeps/{sweep_id}", until, timeout)


def test_service_sweep_runs_side_by_side(svc2, c2, six):
    base = {**BASE, "dataset_id": six["id"]}
    r = c2.post("/v1/sweeps", json={"name": "clip modes", "base": base,
                                    "grid": {"clip": CLIPS, "seed": [0, 1]}})
    assert r.status_code == 202, r.text
    sw = r.json()
    assert r.headers["location"] == f"/v1/sweeps/{sw['id']}"
    done = wait_sweep(c2, sw["id"], 900)
    jobs = [c2.get(f"/v1/jobs/{j}").json() for j in sw["job_ids"]]
    assert done["status"] == "succeeded", (done, [j["error"] for j in jobs],
                                           svc2.tail("worker1.log"), svc2.tail("worker2.log"))
    assert done["progress"]["succeeded"] == 6 and done["progress"]["fraction"] == 1.0
    assert done["finished_at"]
    assert len({j["worker"] for j in jobs}) == 2  # both workers took some

    board = c2.get(f"/v1/sweeps/{sw['id']}/leaderboard").json()
    assert board["status"] == "succeeded" and board["direction"] == "max"
    assert len(board["rows"]) == 3
    means = [row["metrics"]["val_acc"]["mean"] for row in board["rows"]]
    assert means == sorted(means, reverse=True)
    for row in board["rows"]:
        assert row["runs"] == 2 and row["succeeded"] == 2 and row["failed"] == 0
        stat = row["metrics"]["val_acc"]
        assert stat["n"] == 2 and stat["mean"] is not None and stat["sd"] >= 0
        assert row["metrics"]["epochs_to_90pct"]["n"] == 2
    csv_text = c2.get(f"/v1/sweeps/{sw['id']}/leaderboard",
                      params={"format": "csv", "metric": "wall_seconds"}).text
    lines = list(csv.reader(io.StringIO(csv_text)))
    assert lines[0][:4] == ["clip", "runs", "succeeded", "failed"] and len(lines) == 4

    starts = [parse(j["started_at"]) for j in jobs]
    ends = [parse(j["finished_at"]) for j in jobs]
    wall = (max(ends) - min(starts)).total_seconds()
    total = sum((e - s).total_seconds() for s, e in zip(starts, ends))
    print(f"\nsweep of 6 jobs on 2 workers: wall {wall:.1f} s (first start to last end), "
          f"sum of run times {total:.1f} s, ratio {wall / total:.2f}")
    for row in board["rows"]:
        print(f"  {row['label']:<45} val_acc {row['metrics']['val_acc']['mean']:.3f} "
              f"± {row['metrics']['val_acc']['sd']:.3f}")


def test_service_refusals_queue_nothing(c2, six):
    base = {**BASE, "dataset_id": six["id"]}
    before = c2.get("/v1/jobs").json()["total"], c2.get("/v1/sweeps").json()["total"]
    r = c2.post("/v1/sweeps", json={"name": "big", "base": base,
                                    "grid": {"clip": CLIPS, "seed": [0, 1, 2]}})
    assert r.status_code == 422 and "9 jobs" in r.json()["detail"]
    assert "at most 8" in r.json()["detail"]
    r = c2.post("/v1/sweeps", json={"name": "bad", "base": base, "grid": {
        "clip": [NORM5, {"mode": "norm", "max_norm": -1}], "seed": [0]}})
    assert r.status_code == 422
    assert "grid combination {'clip': {'mode': 'norm', 'max_norm': -1}, 'seed': 0}" in \
        r.json()["detail"]
    after = c2.get("/v1/jobs").json()["total"], c2.get("/v1/sweeps").json()["total"]
    assert after == before
    assert c2.get("/v1/jobs", params={"status": "queued"}).json()["total"] == 0


def test_service_cancel_a_running_sweep(c2, six):
    base = {**BASE, "dataset_id": six["id"], "epochs": 500}
    r = c2.post("/v1/sweeps", json={"name": "long", "base": base, "grid": {"seed": [0, 1, 2]}})
    assert r.status_code == 202, r.text
    sw = r.json()
    wait_sweep(c2, sw["id"], 120, until=("running",))
    r = c2.post(f"/v1/sweeps/{sw['id']}/cancel")
    assert r.status_code == 200 and r.json()["cancel_requested"] is True
    for job_id in sw["job_ids"]:
        assert wait_job(c2, job_id, timeout=120)["status"] == "cancelled"
    done = c2.get(f"/v1/sweeps/{sw['id']}").json()
    assert done["status"] == "cancelled" and done["progress"]["cancelled"] == 3
    assert done["progress"]["queued"] == done["progress"]["running"] == 0
    again = c2.post(f"/v1/sweeps/{sw['id']}/cancel")
    assert again.status_code == 200 and again.json()["status"] == "cancelled"


def test_sweeps_are_admin_only(tmp_path):
    import hashlib

    from app.main import create_app
    from facegrad.service.settings import Settings

    def sha(k: str) -> str:
        return hashlib.sha256(k.encode()).hexdigest()

    spec = f"admin:{sha('adm-key')},identify:{sha('id-key')}"
    app = create_app(Settings(data_dir=tmp_path, api_keys=spec, cors_origins=""),
                     reconcile=False)
    with TestClient(app) as c:
        for method, path in (("GET", "/v1/sweeps"), ("POST", "/v1/sweeps"),
                             ("GET", f"/v1/sweeps/{DS}"), ("POST", f"/v1/sweeps/{DS}/cancel"),
                             ("GET", f"/v1/sweeps/{DS}/leaderboard")):
            assert c.request(method, path).status_code == 401
            r = c.request(method, path, headers={"X-API-Key": "id-key"})
            assert r.status_code == 403, (method, path, r.text)
        assert c.get("/v1/sweeps", headers={"X-API-Key": "adm-key"}).status_code == 200
