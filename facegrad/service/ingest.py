"""Ingesting an uploaded dataset: decoding, face detection and alignment of each image, off the
upload request.

``POST /v1/datasets`` checks what it can at once (the archive's directory, the .npz headers and
labels), saves the upload durably in the dataset's folder, stores the dataset as ``ingesting``
and hands it to the :class:`IngestRunner` of its API process: a one-thread pool beside the
request handlers. The ingest writes ``progress`` ({done, total} files) and ``rejected`` as it
goes, then turns the dataset ``ready`` in one UPDATE after its files are stored (each written to a
temporary name, synced and renamed), or ``failed`` with the reason in ``error``.

Why the API process and not a Celery task: a worker runs one training job at a time (a solo pool,
one worker per GPU) for minutes to hours, so an ingest queued on the broker (Redis, or the
embedded one of ``facegrad up``) would wait behind training; ``facegrad up`` and the compose file
start training workers only, and a queue of its own would need processes of its own. The API
process already runs face detection (identify) and holds the upload on its disk; one ingest at a
time per process leaves its other cores to identify. What a broker would give (surviving the
process that took the upload) comes from the lease below and the upload saved before the 202.

Restarts: the runner holds each of its ingests through a lease on the row (``ingest_owner``,
``ingest_expires``) that it renews while the ingest is queued or running. An API process that is
killed stops renewing; the runner of any API process sharing the database and the data folder,
the restarted one included, takes the ingest over once the lease has expired and runs it again
from the saved upload, at most :data:`INGEST_MAX_ATTEMPTS` times (then ``failed``: the process
died each time). A process that stops cleanly hands its ingests back at once. Jobs are taken on
``ready`` datasets only, so a dataset never trains half-stored.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import or_, select, update

from facegrad.data.archive import DatasetError, Limits, check_npz_dataset, check_zip_archive
from facegrad.data.datasets import build_from_npz, build_from_zip
from facegrad.data.imageio import ImageError
from facegrad.service import storage
from facegrad.service.db import Dataset, session_scope, utcnow
from facegrad.service.settings import Settings

log = logging.getLogger("facegrad.ingest")

INGEST_MAX_ATTEMPTS = 3
PROGRESS_EVERY_S = 0.5  # the most often one ingest writes its progress


def limits_from(settings: Settings) -> Limits:
    return Limits(max_upload_bytes=settings.max_upload_bytes,
                  max_members=settings.max_archive_members,
                  max_uncompressed_bytes=settings.max_uncompressed_bytes,
                  max_member_bytes=settings.max_member_bytes,
                  max_compression_ratio=settings.max_compression_ratio,
                  max_pixels=settings.max_image_pixels)


def face_cropper(kind: str):
    """detect='auto': the crop of each image's face. A zip member with no face is rejected on its
    own (ImageError, reported in ``rejected``); for a .npz the whole upload is refused, naming
    the first image without a face."""
    from facegrad.recognition.detect import crop_one

    index = 0

    def crop(rgb):
        nonlocal index
        index += 1
        out = crop_one(rgb, "auto")
        if out is None:
            where = "" if kind == "zip" else f"images[{index - 1}]: "
            raise ImageError(f"{where}no face found in this image; crop the images to the faces "
                             "or upload with detect='none'", 422)
        return out

    return crop


def check_upload(path: Path, kind: str, limits: Limits) -> dict[str, int]:
    """Images per identity, from what an upload says of itself (its directory, or its .npz
    headers and labels), without decoding an image. DatasetError for what is wrong with it."""
    return (check_zip_archive if kind == "zip" else check_npz_dataset)(path, limits)


def upload_path(settings: Settings, dataset_id: str, kind: str) -> Path:
    """Where a dataset's upload is kept until its ingest ends."""
    return storage.dataset_dir(settings, dataset_id) / f"upload.{kind}"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_upload(spooled: Path, dest: Path) -> None:
    """Move a spooled upload to ``dest`` durably: its bytes synced, then renamed (the spool is on
    the same file system, under the data folder), then the new folder's entries synced."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(spooled, "rb") as f:
        os.fsync(f.fileno())
    os.replace(spooled, dest)
    _fsync_dir(dest.parent)
    _fsync_dir(dest.parent.parent)


def clear_files(settings: Settings, dataset_id: str) -> None:
    shutil.rmtree(storage.dataset_dir(settings, dataset_id), ignore_errors=True)


class Stopped(Exception):
    """The ingest stopped before its end: its process is stopping, or it lost its lease."""


def _update_held(settings: Settings, dataset_id: str, owner: str, **values) -> bool:
    """Update the dataset if it is still ingesting under ``owner``'s lease; False if not."""
    with session_scope(settings.db_url) as s:
        res = s.execute(update(Dataset).where(
            Dataset.id == dataset_id, Dataset.status == "ingesting",
            Dataset.ingest_owner == owner).values(**values))
        return res.rowcount == 1


def lease_until(settings: Settings) -> datetime:
    return utcnow() + timedelta(seconds=settings.ingest_lease_seconds)


def run_ingest(settings: Settings, dataset_id: str, owner: str,
               stopping: threading.Event | None = None) -> str:
    """Decode, crop and store the upload of dataset ``dataset_id`` if ``owner`` holds its lease.

    Returns ``ready``, ``failed``, ``stopped`` (``stopping`` was set: the lease is handed back
    and the ingest runs again later) or ``lost`` (another process holds the dataset now, or it
    is no longer ingesting)."""
    with session_scope(settings.db_url) as s:
        ds = s.get(Dataset, dataset_id)
        if ds is None or ds.status != "ingesting" or ds.ingest_owner != owner:
            return "lost"
        kind, detect, attempt = ds.source_format, ds.detect, ds.ingest_attempts
    src = upload_path(settings, dataset_id, kind)
    seen: dict = {"done": 0, "total": 0, "rejected": {}}
    t0 = time.perf_counter()

    def fail(reason: str, status: int) -> str:
        ok = _update_held(settings, dataset_id, owner, status="failed", error=reason,
                          rejected=dict(seen["rejected"]), info={"error_status": status},
                          progress={"done": seen["done"], "total": seen["total"]},
                          ingest_owner=None, ingest_expires=None)
        if not ok:
            return "lost"
        clear_files(settings, dataset_id)  # a failed dataset keeps no files
        log.info("dataset %s: ingest failed after %.1f s: %s", dataset_id,
                 time.perf_counter() - t0, reason)
        return "failed"

    if not src.is_file():
        return fail(f"the upload is missing from the data folder ({src.name}); upload the "
                    "dataset again", 500)

    last = 0.0

    def progress(done: int, total: int, rejected: dict[str, str]) -> None:
        nonlocal last
        seen.update(done=done, total=total, rejected=rejected)
        if stopping is not None and stopping.is_set():
            raise Stopped("the API process is stopping")
        now = time.monotonic()
        if done < total and now - last < PROGRESS_EVERY_S:
            return
        last = now
        if not _update_held(settings, dataset_id, owner, progress={"done": done, "total": total},
                            rejected=dict(rejected), ingest_expires=lease_until(settings)):
            raise Stopped("the lease was lost")

    log.info("dataset %s: ingesting its %s upload (detect=%s, attempt %d)", dataset_id, kind,
             detect, attempt)
    build = build_from_zip if kind == "zip" else build_from_npz
    kw = {"crop": face_cropper(kind)} if detect == "auto" else {}
    try:
        report = build(src, limits_from(settings), progress=progress, **kw)
    except Stopped as e:
        if stopping is not None and stopping.is_set():
            # handed back, not counted as an attempt: any API process may run it again at once
            _update_held(settings, dataset_id, owner, ingest_owner=None, ingest_expires=None,
                         ingest_attempts=Dataset.ingest_attempts - 1)
            log.info("dataset %s: ingest stopped (%s); it runs again later", dataset_id, e)
            return "stopped"
        log.warning("dataset %s: ingest stopped: %s", dataset_id, e)
        return "lost"
    except (DatasetError, ImageError) as e:
        return fail(e.reason, e.status)
    except Exception as e:
        log.exception("dataset %s: ingest crashed", dataset_id)
        return fail(f"internal error while ingesting: {type(e).__name__}: {e}", 500)

    folder = storage.dataset_dir(settings, dataset_id)
    arrays = report.arrays
    arrays.save(folder)
    n = int(arrays.images.shape[0])
    done = _update_held(
        settings, dataset_id, owner, status="ready", num_images=n,
        num_identities=len(report.identities), identities=report.identities,
        rejected=report.rejected, info=report.info, error=None, ingest_owner=None,
        ingest_expires=None, progress={"done": seen["total"], "total": seen["total"]})
    del report, arrays  # the built images file beside the upload is removed with its last map
    if not done:
        return "lost"
    src.unlink(missing_ok=True)
    log.info("dataset %s: ready after %.1f s: %d images, %d rejected", dataset_id,
             time.perf_counter() - t0, n, len(seen["rejected"]))
    return "ready"


class IngestRunner:
    """Runs this API process's ingests one at a time, renews their leases, and takes over the
    ingests whose lease expired (their process died) or that were handed back."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="ingest")
        self.stopping = threading.Event()
        self.interval = max(0.5, min(5.0, settings.ingest_lease_seconds / 4))
        self._held: set[str] = set()
        self._running: str | None = None
        self._idle = threading.Event()  # set while no ingest runs
        self._idle.set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def submit(self, dataset_id: str) -> Future:
        """Run the ingest of a dataset whose lease this runner holds (``self.owner``). Once the
        runner is stopping, the lease is handed back instead (the future's result: stopped)."""
        with self._lock:
            self._held.add(dataset_id)
        if not self.stopping.is_set():
            try:
                return self.pool.submit(self._run, dataset_id)
            except RuntimeError:  # the pool was shut down in the meantime
                pass
        self._hand_back([dataset_id])
        done: Future = Future()
        done.set_result("stopped")
        return done

    def _run(self, dataset_id: str) -> str:
        with self._lock:
            self._running = dataset_id
            self._idle.clear()
        try:
            return run_ingest(self.settings, dataset_id, self.owner, self.stopping)
        except Exception:  # a database outage: the lease expires and the ingest is run again
            log.exception("dataset %s: ingest could not run", dataset_id)
            return "error"
        finally:
            with self._lock:
                self._held.discard(dataset_id)
                self._running = None
                self._idle.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="ingest-leases", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self.renew()
                self.take_over()
            except Exception:
                log.exception("ingest lease pass failed")
            self.stopping.wait(self.interval)

    def renew(self) -> None:
        with self._lock:
            held = list(self._held)
        if not held:
            return
        with session_scope(self.settings.db_url) as s:
            s.execute(update(Dataset).where(
                Dataset.id.in_(held), Dataset.status == "ingesting",
                Dataset.ingest_owner == self.owner).values(
                    ingest_expires=lease_until(self.settings)))

    def take_over(self) -> list[str]:
        """Claim the ingests nobody holds (a dead process's, or handed back) and run them;
        fail those that were already tried INGEST_MAX_ATTEMPTS times. Returns the ids claimed."""
        now = utcnow()
        free = or_(Dataset.ingest_owner.is_(None), Dataset.ingest_expires < now)
        with session_scope(self.settings.db_url) as s:
            ids = s.scalars(select(Dataset.id).where(Dataset.status == "ingesting", free)).all()
        claimed = []
        for dataset_id in ids:
            if self.stopping.is_set():
                break
            with session_scope(self.settings.db_url) as s:
                got = s.execute(update(Dataset).where(
                    Dataset.id == dataset_id, Dataset.status == "ingesting", free,
                    Dataset.ingest_attempts < INGEST_MAX_ATTEMPTS).values(
                        ingest_owner=self.owner, ingest_expires=lease_until(self.settings),
                        ingest_attempts=Dataset.ingest_attempts + 1)).rowcount == 1
                gave_up = not got and s.execute(update(Dataset).where(
                    Dataset.id == dataset_id, Dataset.status == "ingesting", free,
                    Dataset.ingest_attempts >= INGEST_MAX_ATTEMPTS).values(
                        status="failed", ingest_owner=None, ingest_expires=None,
                        info={"error_status": 500},
                        error=f"the ingest was interrupted {INGEST_MAX_ATTEMPTS} times: the "
                        "API process doing it stopped each time (killed, or out of memory?); "
                        "upload the dataset again, or in smaller parts")).rowcount == 1
            if got:
                log.info("dataset %s: taking over its ingest (its process stopped)", dataset_id)
                claimed.append(dataset_id)
                self.submit(dataset_id)
            elif gave_up:
                log.warning("dataset %s: ingest failed: interrupted %d times", dataset_id,
                            INGEST_MAX_ATTEMPTS)
                clear_files(self.settings, dataset_id)
        return claimed

    def stop(self, timeout: float = 10.0) -> None:
        """Stop taking work; the running ingest stops at its next file and hands its dataset
        back, and so do the ones queued here, so that the next process runs them at once.

        Waits up to ``timeout`` for the running one: uvicorn ends the process with the signal
        that stopped it right after the application's shutdown, without waiting for threads."""
        self.stopping.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            queued = [d for d in self._held if d != self._running]
        self._hand_back(queued)
        if not self._idle.wait(timeout):
            log.warning("an ingest did not stop within %.0f s; its lease expires instead",
                        timeout)

    def _hand_back(self, dataset_ids: list[str]) -> None:
        """Release the leases of ingests that did not run here, not counting the attempt."""
        with self._lock:
            self._held.difference_update(dataset_ids)
        if not dataset_ids:
            return
        with session_scope(self.settings.db_url) as s:
            s.execute(update(Dataset).where(
                Dataset.id.in_(dataset_ids), Dataset.status == "ingesting",
                Dataset.ingest_owner == self.owner).values(
                    ingest_owner=None, ingest_expires=None,
                    ingest_attempts=Dataset.ingest_attempts - 1))
