"""Training jobs: create, read, list, metrics history, cancel."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth import admin_only
from app.deps import get_db, get_settings_dep
from app.schemas import Error, JobCreate, JobList, JobMetrics, JobOut, JobStatus
from app.uploads import uuid_path
from facegrad.service import storage
from facegrad.service.db import Dataset, Job, JobEpoch, new_id, utcnow
from facegrad.service.settings import Settings
from worker.queue import BrokerUnavailable, publish_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(admin_only)])


def to_out(j: Job) -> JobOut:
    return JobOut(id=j.id, dataset_id=j.dataset_id, status=j.status, created_at=j.created_at,
                  started_at=j.started_at, finished_at=j.finished_at, config=j.config,
                  progress=j.progress or {}, metrics=j.metrics or {}, clipping=j.clipping or {},
                  checkpoints=j.checkpoints or [], model_id=j.model_id, error=j.error,
                  attempts=j.attempts, resumed_from_epoch=j.resumed_from_epoch,
                  cancel_requested=j.cancel_requested, worker=j.worker, info=j.info or {})


def get_or_404(db: Session, job_id: str) -> Job:
    job = db.get(Job, job_id)
    if job is None:
        raise HTTPException(404, f"no job with id {job_id}")
    return job


def queue_jobs(db: Session, dataset: Dataset, bodies: list[JobCreate], settings: Settings,
               with_rows: Callable[[list[Job]], list] | None = None,
               what: str = "the job was") -> list[Job]:
    """Store one queued Job per body (with the rows ``with_rows(jobs)`` adds, e.g. their sweep)
    in one commit, then publish each to the broker. The one way jobs are created: POST
    /v1/jobs and POST /v1/sweeps both call it.

    The broker down: every row stored here is deleted again and 503 is raised (nothing left
    behind; a message already sent for a deleted job finds no row and is dropped by the worker).
    A dataset that is not ready is refused with 409 (:func:`check_ready`).
    """
    check_ready(dataset)
    check_privacy(settings, dataset, bodies)
    jobs = [Job(id=new_id(), dataset_id=dataset.id,
                config=body.model_dump(exclude={"dataset_id"}), status="queued",
                progress={"epoch": 0, "epochs": body.epochs, "step": 0, "steps_total": 0,
                          "fraction": 0.0})
            for body in bodies]
    rows = [*jobs, *(with_rows(jobs) if with_rows else [])]
    db.add_all(rows)
    db.commit()
    try:
        for job in jobs:
            publish_job(job.id)
            job.enqueued_at = utcnow()
    except BrokerUnavailable as e:
        db.rollback()
        for row in rows:
            db.delete(row)
        db.commit()
        raise HTTPException(503, f"{e}; {what} not accepted, try again when /readyz "
                            "answers 200") from e
    db.commit()
    return jobs


def check_privacy(settings: Settings, dataset: Dataset, bodies: list[JobCreate]) -> None:
    """422 for a private job whose guarantee would not hold on this dataset, or whose target
    epsilon cannot be reached (the same plan the worker will make: its sampling rate, steps
    and noise come from the split it will train on)."""
    private = [b for b in bodies if b.privacy is not None]
    if not private:
        return
    from facegrad.data.store import FaceArrays
    from facegrad.training.loop import privacy_plan_for_dataset
    from facegrad.training.private import PrivacyError

    data = FaceArrays.load(storage.dataset_dir(settings, dataset.id))
    for body in private:
        try:
            privacy_plan_for_dataset(body, data)
        except PrivacyError as e:
            raise HTTPException(422, f"privacy: {e}") from None


def dataset_or_404(db: Session, dataset_id: str) -> Dataset:
    ds = db.get(Dataset, dataset_id.lower())
    if ds is None:
        raise HTTPException(404, f"no dataset with id {dataset_id}; upload one with "
                            "POST /v1/datasets")
    return ds


def check_ready(ds: Dataset) -> None:
    """409 unless the dataset is ready: jobs never start on a dataset still ingesting (it is
    not stored yet) or one that failed."""
    if ds.status == "ingesting":
        p = ds.progress or {}
        raise HTTPException(409, f"dataset {ds.id} is still ingesting ({p.get('done', 0)} of "
                            f"{p.get('total', '?')} files done); post the job again once GET "
                            f"/v1/datasets/{ds.id} says status 'ready'")
    if ds.status != "ready":
        raise HTTPException(409, f"dataset {ds.id} failed to ingest: {ds.error}; upload it "
                            "again")


def request_cancel(job: Job) -> None:
    """Cancel a queued or running job: a queued one at once, a running one at its next step
    (its worker sees cancel_requested)."""
    if job.status == "queued":
        job.status, job.finished_at = "cancelled", utcnow()
    job.cancel_requested = True


@router.post("", status_code=202, response_model=JobOut,
             responses={404: {"model": Error},
                        409: {"model": Error, "description": "the dataset is still ingesting, "
                              "or failed"},
                        503: {"model": Error, "description": "the broker is down"}},
             summary="Queue a training job")
def create_job(body: JobCreate, response: Response, db: Session = Depends(get_db),
               settings: Settings = Depends(get_settings_dep)) -> JobOut:
    ds = dataset_or_404(db, body.dataset_id)
    job = queue_jobs(db, ds, [body], settings)[0]
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return to_out(job)


@router.get("", response_model=JobList, summary="List jobs, newest first")
def list_jobs(status: JobStatus | None = None, dataset_id: str | None = None,
              limit: int = Query(50, ge=1, le=500),
              offset: int = Query(0, ge=0, le=1_000_000_000),
              db: Session = Depends(get_db)) -> JobList:
    q = select(Job)
    if status:
        q = q.where(Job.status == status)
    if dataset_id:
        q = q.where(Job.dataset_id == dataset_id)
    total = db.scalar(select(func.count()).select_from(q.subquery()))
    rows = db.scalars(q.order_by(Job.created_at.desc()).limit(limit).offset(offset)).all()
    return JobList(items=[to_out(j) for j in rows], total=total, limit=limit, offset=offset)


@router.get("/{job_id}", response_model=JobOut, responses={404: {"model": Error}})
def get_job(job_id: str = uuid_path("job"), db: Session = Depends(get_db)) -> JobOut:
    return to_out(get_or_404(db, job_id))


@router.get("/{job_id}/metrics", response_model=JobMetrics, responses={404: {"model": Error}},
            summary="Per-epoch history: losses, accuracies, clipping telemetry")
def get_job_metrics(job_id: str = uuid_path("job"), db: Session = Depends(get_db)) -> JobMetrics:
    job = get_or_404(db, job_id)
    rows = db.scalars(select(JobEpoch).where(JobEpoch.job_id == job.id)
                      .order_by(JobEpoch.epoch)).all()
    return JobMetrics(job_id=job.id, status=job.status, history=[r.record for r in rows])


@router.post("/{job_id}/cancel", response_model=JobOut,
             responses={404: {"model": Error}, 409: {"model": Error}},
             summary="Cancel a job: a queued one at once, a running one at its next step")
def cancel_job(job_id: str = uuid_path("job"), db: Session = Depends(get_db)) -> JobOut:
    job = get_or_404(db, job_id)
    if job.status in ("succeeded", "failed"):
        raise HTTPException(409, f"job already {job.status}; only queued or running jobs can "
                            "be cancelled")
    request_cancel(job)
    db.commit()
    return to_out(job)
