"""Identify under load: POST /v1/identify with 1, 8, 32 concurrent clients vs the forward alone.

    .venv/bin/python bench/identify_load.py [--threads N] [--embedded] [--seconds 8]

Starts the real service (testkit/harness.py: a private redis-server, the API under uvicorn and one
Celery worker, in a temporary folder), uploads the ORL training split, trains a small default
model for ``--epochs`` epochs through the API, stops the worker (so it takes no CPU), then runs
``--rounds`` rounds of, in turn:

- forward only: ``LoadedModel.embed`` (normalise, forward) on the stored chips of the
  held-out ORL images, batch 1, 8 and 32, in this process with the service's thread count
  (batch 32 also right before and right after the 32-client level, which the bar compares
  with: the median over rounds of those paired ratios);
- load: 1, 8 and 32 concurrent clients, each sending one held-out ORL PNG per request over its
  own keep-alive loopback connection, for ``--seconds`` or ``--requests``, whichever comes first.
  The client is a minimal asyncio HTTP/1.1 client with pre-encoded multipart bodies, so that the
  load generator takes little of the CPUs it shares with the server (its CPU time is printed).

Bars (2-core CPU): images/s with 32 clients >= 1.5x one client and >= 0.6x forward only at batch
32; p99 latency at every concurrency <= 1.5x the time of one batch-32 forward (a request that
arrives while a full batch is being described waits for it, then for its own).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from _common import (
    crops_of,
    device_parser,
    footer,
    header,
    median,
    orl_split,
    pct,
    setup,
    table,
    verdict,
)

import torch  # isort: skip

LEVELS = (1, 8, 32)
BATCHES = (1, 8, 32)
P99_BAR_B32 = 1.5  # p99 latency <= this many batch-32 forward times


# --- a small keep-alive HTTP/1.1 client -----------------------------------------------------

def multipart(fields: dict[str, str], filename: str, content: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = []
    for k, v in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
                     .encode())
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
                 f'filename="{filename}"\r\nContent-Type: image/png\r\n\r\n'.encode())
    parts.append(content + f"\r\n--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def request_bytes(port: int, path: str, body: bytes, ctype: str) -> bytes:
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\nConnection: keep-alive\r\n\r\n")
    return head.encode() + body


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    body = b""
    while True:  # chunked
        size = int((await reader.readuntil(b"\r\n")).strip(), 16)
        chunk = await reader.readexactly(size + 2)
        if size == 0:
            return status, body
        body += chunk[:-2]


async def drive(port: int, requests: list[bytes], clients: int, max_requests: int,
                max_seconds: float, timeout: float = 60.0) -> dict:
    """``clients`` connections, each sending requests back to back until the bounds are hit."""
    conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(clients)]
    latencies: list[float] = []
    errors: list[str] = []
    counter = {"n": 0}

    async def one(reader, writer, i) -> float:
        t0 = time.perf_counter()
        writer.write(requests[i % len(requests)])
        try:
            status, body = await asyncio.wait_for(read_response(reader), timeout)
        except asyncio.TimeoutError:
            raise SystemExit(f"no answer in {timeout:.0f} s at {clients} clients: the API "
                             "is stalled") from None
        dt = time.perf_counter() - t0
        if status != 200:
            errors.append(f"{status}: {body[:200]!r}")
        return dt

    # warm-up: one request per connection (the server's threads, the model cache)
    await asyncio.gather(*(one(r, w, i) for i, (r, w) in enumerate(conns)))
    start = time.perf_counter()
    deadline = start + max_seconds

    async def client(reader, writer) -> None:
        while counter["n"] < max_requests and time.perf_counter() < deadline:
            i = counter["n"]
            counter["n"] += 1
            latencies.append(await one(reader, writer, i))

    cpu0 = time.process_time()
    await asyncio.gather(*(client(r, w) for r, w in conns))
    wall = time.perf_counter() - start
    cpu = time.process_time() - cpu0
    for _, w in conns:
        w.close()
    return {"lat": latencies, "wall": wall, "errors": errors, "client_cpu": cpu}


# --- the service ------------------------------------------------------------------------------

def start_service(workdir: Path, embedded: bool, threads: int, extra_path: str | None = None):
    from testkit.harness import ROOT, RedisServer, Service

    redis = None
    if not embedded:
        redis = RedisServer(workdir / "redis")
        redis.start()
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    if extra_path:
        env["PYTHONPATH"] = f"{extra_path}:{ROOT}"
    svc = Service(workdir / "svc", None if embedded else redis.url, **env)
    svc.start_api()
    worker = svc.start_worker()
    return redis, svc, worker


def train_model(svc, epochs: int) -> tuple[str, Path, float]:
    from testkit.harness import upload, wait_job

    train, _ = orl_split()
    with svc.client() as c:
        items = c.get("/v1/models").json()["items"]
        if items:  # --reuse: the newest model of an earlier run's service folder
            m = items[0]
            folder = next(p.parent for p in svc.data_dir.rglob("model.json")
                          if m["job_id"] in str(p))
            return m["id"], folder, float("nan")
        ds = upload(c, train, "bench-orl-train")
        t0 = time.perf_counter()
        r = c.post("/v1/jobs", json={"dataset_id": ds["id"], "epochs": epochs})
        assert r.status_code == 202, r.text
        job = wait_job(c, r.json()["id"], timeout=1800)
        took = time.perf_counter() - t0
        assert job["status"] == "succeeded", (job, svc.tail("worker1.log"))
    folder = next(p.parent for p in svc.data_dir.rglob("model.json") if job["id"] in str(p))
    return job["model_id"], folder, took


def forward_rate(lm, crops, batch: int, seconds: float = 1.5) -> float:
    x = crops[:batch]
    lm.embed(x)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        lm.embed(x)
        n += batch
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = device_parser(__doc__.splitlines()[0])
    ap.add_argument("--embedded", action="store_true",
                    help="the embedded SQLite broker instead of a private redis-server")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the model under test")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=8.0, help="longest a load level runs")
    ap.add_argument("--requests", type=int, default=600, help="most requests per load level")
    ap.add_argument("--levels", type=int, nargs="+", default=list(LEVELS),
                    help="concurrent clients per load level (the bars need 1 and 32)")
    ap.add_argument("--service-path", metavar="DIR",
                    help="prepended to the service's PYTHONPATH: to try server packages (e.g. "
                    "httptools, uvloop installed with pip --target DIR) without adding them to "
                    ".venv")
    ap.add_argument("--keep", action="store_true", help="keep the temporary service folder")
    ap.add_argument("--reuse", metavar="DIR",
                    help="a service folder kept by --keep: use its model instead of training")
    args = ap.parse_args()
    if args.device != "cpu":
        raise SystemExit("identify runs on the API's CPU (its model cache is CPU-only); "
                         "this benchmark has no --device cuda")
    setup(args)
    threads = args.threads or 2  # testkit/harness.py's Service sets OMP_NUM_THREADS=2
    torch.set_num_threads(threads)
    header("identify_load: POST /v1/identify under 1/8/32 clients vs LoadedModel.embed",
           torch.device("cpu"))

    from facegrad.recognition.inference import LoadedModel

    workdir = Path(args.reuse or tempfile.mkdtemp(prefix="facegrad-bench-identify-"))
    redis, svc, worker = start_service(workdir, args.embedded, threads, args.service_path)
    try:
        model_id, folder, took = train_model(svc, args.epochs)
        svc.kill(worker)  # an idle Celery worker still polls; the API is what is measured
        how = (f"reused from {workdir}" if took != took else
               f"{args.epochs} epochs, trained through the API in {took:.0f} s")
        print(f"service: {'embedded broker' if args.embedded else 'redis'}, API threads "
              f"OMP_NUM_THREADS={threads}; model {model_id} ({how})"
              + (f"; service PYTHONPATH starts with {args.service_path}"
                 if args.service_path else ""))
        _, test = orl_split()
        paths = [p for ps in test.values() for p in ps]
        reqs = []
        for p in paths:
            body, ctype = multipart({"model_id": model_id}, p.name, p.read_bytes())
            reqs.append(request_bytes(svc.port, "/v1/identify", body, ctype))
        lm = LoadedModel(folder, "cpu")
        crops = crops_of(paths)
        # a correctness check before timing: the same answer as the model here
        with svc.client() as c:
            r = c.post("/v1/identify", files={"file": (paths[0].name, paths[0].read_bytes())},
                       data={"model_id": model_id})
            assert r.status_code == 200, r.text
            got = r.json()["results"][0]["faces"][0]["candidates"][0]["identity"]
        want = lm.match(lm.embed(crops[:1]), 1, -1)[0][2][0][0]
        assert got == want, (got, want)
        print(f"{len(paths)} held-out ORL images, {args.rounds} rounds; each load level runs "
              f"for {args.seconds:.0f} s or {args.requests} requests")

        fwd = {b: [] for b in BATCHES}
        load = {c: [] for c in args.levels}
        paired = []  # per round: 32-client images/s over forward-only b32 right around it
        for _ in range(args.rounds):
            for b in BATCHES:
                fwd[b].append(forward_rate(lm, crops, b))
            for c in args.levels:
                if c == 32:
                    before = forward_rate(lm, crops, 32)
                load[c].append(asyncio.run(drive(svc.port, reqs, c, args.requests,
                                                 args.seconds)))
                if c == 32:
                    after = forward_rate(lm, crops, 32)
                    fwd[32] += [before, after]
                    r = load[c][-1]
                    paired.append(len(r["lat"]) / r["wall"] / ((before + after) / 2))
    finally:
        svc.stop()
        if redis:
            redis.stop()
        if args.keep or args.reuse:
            print(f"service folder kept: {workdir} (--reuse {workdir})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    fwd_ips = {b: median(v) for b, v in fwd.items()}
    rows_f = [[f"forward only, batch {b}", fwd_ips[b], 1000 * b / fwd_ips[b]] for b in BATCHES]
    print()
    print(table(["variant", "images/s", "ms per batch"], rows_f))

    rows, stats = [], {}
    first = args.levels[0]
    for c in args.levels:
        runs = load[c]
        lat = [x * 1000 for r in runs for x in r["lat"]]
        ips = median([len(r["lat"]) / r["wall"] for r in runs])
        n = sum(len(r["lat"]) for r in runs)
        errors = sum(len(r["errors"]) for r in runs)
        cpu_ms = 1000 * sum(r["client_cpu"] for r in runs) / max(1, n)
        stats[c] = {"ips": ips, "p99": pct(lat, 99)}
        rows.append([f"{c} client{'s' if c > 1 else ''}", n, errors, ips, pct(lat, 50),
                     pct(lat, 95), pct(lat, 99), ips / fwd_ips[32], ips / stats[first]["ips"],
                     cpu_ms])
        for r in runs:
            for e in r["errors"][:3]:
                print(f"  error at {c} clients: {e}")
    print()
    print(table(["load", "requests", "errors", "images/s", "p50 ms", "p95 ms", "p99 ms",
                 "x fwd b32", "x 1 client", "client cpu ms/req"], rows))
    if 1 not in stats or 32 not in stats:
        print("the bars need load levels 1 and 32")
        footer()
        return
    top = stats[32]
    p99_bar = P99_BAR_B32 * 1000 * 32 / fwd_ips[32]
    checks = [
        (f"images/s at 32 clients >= 1.5x one client ({top['ips'] / stats[1]['ips']:.2f}x)",
         top["ips"] >= 1.5 * stats[1]["ips"]),
        (f"images/s at 32 clients >= 0.6x forward only at batch 32 "
         f"({median(paired):.2f}x, median over rounds of the 32-client rate over forward only "
         "at batch 32 measured just before and after it)", median(paired) >= 0.6),
        (f"p99 <= {P99_BAR_B32}x one batch-32 forward = {p99_bar:.0f} ms at every level "
         f"(worst {max(s['p99'] for s in stats.values()):.0f} ms)",
         all(s["p99"] <= p99_bar for s in stats.values())),
    ]
    print()
    for text, ok in checks:
        print(f"bar: {text}: {verdict(ok)}")
    errors = sum(len(r["errors"]) for runs in load.values() for r in runs)
    if errors:
        print(f"{errors} requests failed")
    print(json.dumps({"bars_met": all(ok for _, ok in checks)}))
    footer()


if __name__ == "__main__":
    main()
