"""Running one training job against the database: lease, train, record, finish.

Plain functions (no Celery): the Celery task calls ``run_job``. A job row carries a lease
(``lease_owner``, ``lease_expires``) renewed by a heartbeat thread; a second delivery of the same
job (a broker redelivery, a reconciler re-queue) finds the lease held and does nothing, while a
job whose worker died has an expired lease and is taken over, resuming from its last checkpoint.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import or_, update

from facegrad.data.checkpoint import CheckpointError
from facegrad.data.store import FaceArrays
from facegrad.pipeline import run_training_job
from facegrad.service import storage, worker_metrics
from facegrad.service.db import Dataset, Job, JobEpoch, Model, session_scope, utcnow
from facegrad.service.logging_setup import job_id_var
from facegrad.service.settings import Settings
from facegrad.training.config import TrainConfig
from facegrad.training.distributed import RankFailed
from facegrad.training.loop import Cancelled, Hooks, TrainingError

log = logging.getLogger("facegrad.service.jobs")
TERMINAL = ("succeeded", "failed", "cancelled")


def acquire_lease(settings: Settings, job_id: str, owner: str) -> bool:
    """Take the job if it is queued, or running under an expired lease. Atomic in SQL."""
    now = utcnow()
    with session_scope(settings.db_url) as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(("queued", "running")),
                   Job.cancel_requested.is_(False),
                   or_(Job.lease_owner.is_(None), Job.lease_expires < now))
            .values(status="running", lease_owner=owner, worker=owner,
                    lease_expires=now + timedelta(seconds=settings.job_lease_seconds),
                    attempts=Job.attempts + 1, started_at=now)
        )
        return res.rowcount == 1


class Heartbeat(threading.Thread):
    """Renews the lease and watches for cancellation while a job trains."""

    def __init__(self, settings: Settings, job_id: str, owner: str):
        super().__init__(daemon=True, name=f"lease-{job_id[:8]}")
        self.settings, self.job_id, self.owner = settings, job_id, owner
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._done = threading.Event()  # not _stop: a Thread method of that name runs after fork
        self._context = contextvars.copy_context()  # its log lines carry the job id too

    def beat(self) -> None:
        with session_scope(self.settings.db_url) as s:
            job = s.get(Job, self.job_id)
            if job is None or job.lease_owner != self.owner:
                self.lost.set()
                return
            if job.cancel_requested:
                self.cancelled.set()
            job.lease_expires = utcnow() + timedelta(seconds=self.settings.job_lease_seconds)

    def run(self) -> None:
        self._context.run(self._run)

    def _run(self) -> None:
        interval = min(1.0, self.settings.job_lease_seconds / 4)
        while not self._done.wait(interval):
            try:
                self.beat()
            except Exception:  # a database hiccup must not kill the training thread
                log.exception("lease renewal for job %s failed", self.job_id)

    def stop(self) -> None:
        self._done.set()


def _update_job(settings: Settings, job_id: str, **values) -> None:
    with session_scope(settings.db_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / "checkpoints").glob("epoch-*.json"))
    return found[-1] if found else None


def run_job(settings: Settings, job_id: str, owner: str) -> str:
    """Train job ``job_id`` if it is ours to run; returns its final (or current) status, or
    "retry" when the attempt failed in a way another attempt may not (a training process of a
    multi-device job died): the job is queued again and the caller re-publishes it."""
    token = job_id_var.set(job_id)
    worker_metrics.BUSY.set(1)
    t0 = time.perf_counter()
    status = "error"
    try:
        status = _run_job(settings, job_id, owner)
        return status
    finally:
        worker_metrics.BUSY.set(0)
        worker_metrics.JOBS.labels(status).inc()
        if status in TERMINAL:
            log.info("job %s: %s after %.1f s", job_id, status, time.perf_counter() - t0)
        job_id_var.reset(token)


def _run_job(settings: Settings, job_id: str, owner: str) -> str:
    if not acquire_lease(settings, job_id, owner):
        with session_scope(settings.db_url) as s:
            job = s.get(Job, job_id)
            status = job.status if job else "missing"
        log.info("job %s not taken (status %s): already running elsewhere or finished",
                 job_id, status)
        if job is not None and job.cancel_requested and job.status == "queued":
            _update_job(settings, job_id, status="cancelled", finished_at=utcnow())
        return status

    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        cfg = TrainConfig.model_validate(job.config)
        dataset_id = job.dataset_id
        attempt = job.attempts
        dataset = s.get(Dataset, dataset_id)
        not_ready = "deleted" if dataset is None else (
            None if dataset.status == "ready" else dataset.status)
    if not_ready:  # the API queues jobs on ready datasets only; never train on a partial one
        _update_job(settings, job_id, status="failed", finished_at=utcnow(), lease_owner=None,
                    error=f"dataset {dataset_id} is {not_ready}, not ready: nothing to train on")
        return "failed"
    log.info("job %s: training %s for %d epochs on dataset %s, clip %s (attempt %d)", job_id,
             cfg.architecture, cfg.epochs, dataset_id, cfg.clip.mode, attempt)
    run_dir = storage.run_dir(settings, job_id)
    heartbeat = Heartbeat(settings, job_id, owner)
    heartbeat.start()
    try:
        resume = latest_checkpoint(run_dir)
        dataset_dir = storage.dataset_dir(settings, dataset_id)
        data = FaceArrays.load(dataset_dir)
        hooks = _hooks(settings, job_id, heartbeat)
        pretrained = storage.pretrained_dir(settings)
        try:
            result = run_training_job(cfg, data, run_dir, hooks, resume=resume,
                                      pretrained_dir=pretrained, dataset_dir=dataset_dir)
        except CheckpointError as e:
            log.warning("job %s: checkpoint %s unusable (%s); starting over", job_id, resume, e)
            result = run_training_job(cfg, data, run_dir, hooks, resume=None,
                                      pretrained_dir=pretrained, dataset_dir=dataset_dir)
        return _finish(settings, job_id, dataset_id, cfg, result)
    except RankFailed as e:
        if attempt < settings.job_max_attempts:
            # back to the queue: the caller re-publishes it, and it resumes from its checkpoint
            log.warning("job %s: attempt %d failed (%s); queued again", job_id, attempt, e)
            _update_job(settings, job_id, status="queued", lease_owner=None, enqueued_at=None,
                        error=f"attempt {attempt} failed and is retried: {e}")
            return "retry"
        _update_job(settings, job_id, status="failed", finished_at=utcnow(), lease_owner=None,
                    error=f"failed on each of {attempt} attempts; the last: {e}")
        return "failed"
    except Cancelled:
        _update_job(settings, job_id, status="cancelled", finished_at=utcnow(),
                    lease_owner=None)
        return "cancelled"
    except TrainingError as e:
        _update_job(settings, job_id, status="failed", error=str(e), finished_at=utcnow(),
                    lease_owner=None)
        return "failed"
    except Exception as e:
        log.exception("job %s crashed", job_id)
        _update_job(settings, job_id, status="failed", finished_at=utcnow(), lease_owner=None,
                    error=f"internal error in the worker: {type(e).__name__}: {e}")
        return "failed"
    finally:
        heartbeat.stop()


def _hooks(settings: Settings, job_id: str, heartbeat: Heartbeat) -> Hooks:
    def on_progress(p: dict) -> None:
        p["fraction"] = round(p["step"] / max(1, p["steps_total"]), 4)
        _update_job(settings, job_id, progress=p | {"stage": "training"})

    def on_epoch(rec: dict) -> None:
        with session_scope(settings.db_url) as s:
            s.merge(JobEpoch(job_id=job_id, epoch=rec["epoch"], record=rec))
            job = s.get(Job, job_id)
            epochs = job.config.get("epochs", rec["epoch"])
            steps_total = int(rec["step"] * epochs / rec["epoch"])
            job.progress = {"epoch": rec["epoch"], "epochs": epochs, "step": rec["step"],
                            "steps_total": steps_total,
                            "fraction": round(rec["step"] / max(1, steps_total), 4),
                            "stage": "training"}
            job.metrics = {k: rec[k] for k in ("train_loss", "train_acc", "val_loss", "val_acc",
                                               "epsilon") if k in rec}
            job.clipping = rec["clipping_total"]
            config = dict(job.config)
        worker_metrics.observe_epoch(rec, config)
        clip = rec.get("clipping") or {}
        log.info("job %s: epoch %d/%d train loss %.4f acc %.3f, val acc %s, %d/%d steps "
                 "clipped, %.2f s", job_id, rec["epoch"], epochs, rec["train_loss"],
                 rec["train_acc"], "-" if rec.get("val_acc") is None else f"{rec['val_acc']:.3f}",
                 clip.get("clipped_steps", 0), clip.get("steps", 0), rec.get("epoch_seconds", 0))

    def on_checkpoint(path: Path, epoch: int) -> None:
        with session_scope(settings.db_url) as s:
            job = s.get(Job, job_id)
            job.checkpoints = [c for c in job.checkpoints if c["epoch"] != epoch] + [
                {"epoch": epoch, "path": str(path.relative_to(settings.data_dir.resolve()))
                 if path.is_relative_to(settings.data_dir.resolve()) else str(path),
                 "created_at": utcnow().isoformat()}]

    def on_resume(epoch: int) -> None:
        _update_job(settings, job_id, resumed_from_epoch=epoch)

    def on_stage(stage: str) -> None:  # the steps after training: the fraction stays training's
        with session_scope(settings.db_url) as s:
            job = s.get(Job, job_id)
            job.progress = dict(job.progress or {}) | {"stage": stage}

    return Hooks(on_progress=on_progress, on_epoch=on_epoch, on_checkpoint=on_checkpoint,
                 should_stop=lambda: heartbeat.cancelled.is_set() or heartbeat.lost.is_set(),
                 on_resume=on_resume, on_stage=on_stage)


def _finish(settings: Settings, job_id: str, dataset_id: str, cfg: TrainConfig, result) -> str:
    meta = result.model_meta
    last = result.history[-1] if result.history else {}
    metrics = {k: last.get(k) for k in ("train_loss", "train_acc", "val_loss", "val_acc")}
    metrics |= {"open_set": result.open_set}
    if meta.get("privacy"):
        metrics |= {"epsilon": meta["privacy"]["epsilon"], "privacy": meta["privacy"]}
    with session_scope(settings.db_url) as s:
        dataset = s.get(Dataset, dataset_id)
        model = Model(job_id=job_id, dataset_id=dataset_id, architecture=cfg.architecture,
                      path=str(result.model_path.resolve()), labels=meta["labels"],
                      metrics=metrics, config=cfg.model_dump(),
                      preprocessing=meta["preprocessing"], open_set=result.open_set,
                      threshold=result.open_set["threshold"],
                      detect=dataset.detect if dataset else "none")
        s.add(model)
        s.flush()
        job = s.get(Job, job_id)
        job.status, job.model_id, job.finished_at = "succeeded", model.id, utcnow()
        job.metrics, job.lease_owner = metrics, None
        job.clipping = result.clipping
        job.progress = dict(job.progress or {}) | {"fraction": 1.0, "stage": "done"}
        job.info = dict(job.info or {}) | result.info
        if job.error:  # an earlier attempt's failure, retried: kept as history, not as an error
            job.info = job.info | {"earlier_attempt": job.error}
            job.error = None
    return "succeeded"


def jobs_to_requeue(settings: Settings, grace_seconds: float) -> tuple[list[str], list[str]]:
    """(dead, waiting): running jobs whose lease expired, and queued jobs not (re)sent lately.

    Both are candidates for a new broker message; ``dead`` ones surely need one (their worker
    is gone), ``waiting`` ones only if the broker lost theirs.
    """
    now = utcnow()
    cutoff = now - timedelta(seconds=grace_seconds)
    with session_scope(settings.db_url) as s:
        dead = s.scalars(
            Job.__table__.select().with_only_columns(Job.id).where(
                Job.status == "running", Job.lease_expires < now,
                or_(Job.enqueued_at.is_(None), Job.enqueued_at < cutoff))).all()
        waiting = s.scalars(
            Job.__table__.select().with_only_columns(Job.id).where(
                Job.status == "queued", Job.cancel_requested.is_(False),
                or_(Job.enqueued_at.is_(None), Job.enqueued_at < cutoff))).all()
    return list(dead), list(waiting)


def mark_enqueued(settings: Settings, job_id: str) -> None:
    _update_job(settings, job_id, enqueued_at=utcnow())
