"""Queue latency: POST /v1/jobs until the job is running, with an idle worker on Redis.

    .venv/bin/python bench/queue_latency.py [--jobs 10] [--embedded]

Starts the real service (testkit/harness.py: a private redis-server, the API, one Celery worker),
uploads a tiny dataset (4 ORL identities x 5 images), then, one job at a time with the worker
idle: POST /v1/jobs (seed_cnn, 32x32, 1 epoch), poll GET /v1/jobs/{id} every 10 ms until the
status is ``running``, cancel it, wait until it has ended, and let the worker go idle again.

Figures per job: submit -> running as the client sees it (from sending the POST to the first
GET that shows ``running``); the server's own view, ``started_at - created_at``; and, as the
baseline measured in the same run, the round trip of the POST itself and of one GET (what a
status check costs, i.e. the resolution of the measurement). Bar: p50 submit -> running < 1 s.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import datetime
from pathlib import Path

from _common import footer, header, median, orl_split, pct, table, verdict

BAR_S = 1.0


def ts(s: str) -> float:
    return datetime.fromisoformat(s.replace("Z", "+00:00")).timestamp()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--embedded", action="store_true",
                    help="the embedded SQLite broker instead of a private redis-server")
    ap.add_argument("--idle", type=float, default=1.0,
                    help="seconds the worker sits idle before each submission")
    args = ap.parse_args()
    header("queue_latency: POST /v1/jobs -> running, idle worker")

    from testkit.harness import RedisServer, Service, upload, wait_job

    workdir = Path(tempfile.mkdtemp(prefix="facegrad-bench-queue-"))
    redis = None
    if not args.embedded:
        redis = RedisServer(workdir / "redis")
        redis.start()
    svc = Service(workdir / "svc", None if args.embedded else redis.url)
    rows, lat, server, posts, gets, ends = [], [], [], [], [], []
    try:
        svc.start_api()
        svc.start_worker()
        train, _ = orl_split()
        tiny = {k: train[k][:5] for k in sorted(train)[:4]}
        with svc.client() as c:
            ds = upload(c, tiny, "bench-tiny")
            body = {"dataset_id": ds["id"], "epochs": 1, "architecture": "seed_cnn",
                    "image_size": 32, "batch_size": 8, "optimizer": {"name": "sgd"},
                    "learning_rate": 0.01}
            # the first job also waits for the worker to connect; it is not counted
            r = c.post("/v1/jobs", json=body)
            assert r.status_code == 202, r.text
            first = wait_job(c, r.json()["id"], timeout=300)
            assert first["status"] == "succeeded", (first, svc.tail("worker1.log"))
            for i in range(args.jobs):
                time.sleep(args.idle)
                t0 = time.perf_counter()
                r = c.post("/v1/jobs", json=body)
                t_post = time.perf_counter() - t0
                assert r.status_code == 202, r.text
                job_id = r.json()["id"]
                seen = None
                while time.perf_counter() - t0 < 60:
                    g0 = time.perf_counter()
                    job = c.get(f"/v1/jobs/{job_id}").json()
                    gets.append(time.perf_counter() - g0)
                    if job["status"] != "queued":
                        seen = time.perf_counter() - t0
                        break
                    time.sleep(0.01)
                assert seen is not None, f"job {job_id} still queued after 60 s"
                status = job["status"]
                c.post(f"/v1/jobs/{job_id}/cancel")
                end = wait_job(c, job_id, timeout=120)
                srv = ts(job["started_at"]) - ts(job["created_at"]) if job["started_at"] else None
                lat.append(seen)
                posts.append(t_post)
                if srv is not None:
                    server.append(srv)
                ends.append(end["status"])
                rows.append([i + 1, t_post * 1000, seen * 1000,
                             None if srv is None else srv * 1000, status, end["status"]])
    finally:
        svc.stop()
        if redis:
            redis.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"broker: {'embedded SQLite' if args.embedded else 'redis'}; {args.jobs} jobs, "
          f"worker idle {args.idle:.1f} s before each")
    print()
    print(table(["job", "POST ms", "submit->running ms", "server created->started ms",
                 "status seen", "ended"], rows))
    p50 = median(lat)
    print()
    print(table(["figure", "p50 ms", "p90 ms", "max ms"], [
        ["submit -> running (client)", p50 * 1000, pct(lat, 90) * 1000, max(lat) * 1000],
        ["created -> started (server)", median(server) * 1000, pct(server, 90) * 1000,
         max(server) * 1000 if server else float("nan")],
        ["baseline: POST /v1/jobs round trip", median(posts) * 1000, pct(posts, 90) * 1000,
         max(posts) * 1000],
        ["baseline: GET /v1/jobs/{id} round trip", median(gets) * 1000, pct(gets, 90) * 1000,
         max(gets) * 1000],
    ]))
    print(f"\nsubmit -> running p50 = {p50 / median(posts):.1f}x the POST round trip, "
          f"{p50 / BAR_S:.2f}x the bar")
    print(f"bar (p50 submit -> running < {BAR_S:.0f} s): {verdict(p50 < BAR_S)}")
    footer()


if __name__ == "__main__":
    main()
