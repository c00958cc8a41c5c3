"""Sweeps: queue one job per combination of a grid of settings, follow them, compare them."""

from __future__ import annotations

from datetime import timezone
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth import admin_only
from app.deps import get_db, get_settings_dep
from app.routes.jobs import dataset_or_404, queue_jobs, request_cancel
from app.schemas import Error, JobCreate, Leaderboard, SweepCreate, SweepList, SweepOut
from app.uploads import uuid_path
from facegrad.service import sweeps
from facegrad.service.db import Job, JobEpoch, Sweep, utcnow
from facegrad.service.settings import Settings

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"], dependencies=[Depends(admin_only)])
COUNTS = ("queued", "running", "succeeded", "failed", "cancelled")


def _jobs_of(db: Session, job_ids: list[str]) -> dict[str, Job]:
    if not job_ids:
        return {}
    return {j.id: j for j in db.scalars(select(Job).where(Job.id.in_(job_ids)))}


def _out(sweep: Sweep, jobs: dict[str, Job]) -> SweepOut:
    """The sweep with its status and progress read off its jobs' rows; finished_at is set (to
    its last job's end) the first time it is seen ended."""
    rows = [jobs[i] for i in sweep.job_ids if i in jobs]
    statuses = [j.status for j in rows]
    status = sweeps.sweep_status(statuses, sweep.cancel_requested)
    if sweep.finished_at is None and status not in ("queued", "running"):
        # SQLite hands back naive datetimes (UTC); a job ended in this session holds an aware one
        ends = [j.finished_at if j.finished_at.tzinfo else
                j.finished_at.replace(tzinfo=timezone.utc)
                for j in rows if j.finished_at is not None]
        sweep.finished_at = max(ends) if ends else utcnow()
    fractions = [1.0 if j.status in sweeps.TERMINAL
                 else float((j.progress or {}).get("fraction") or 0.0) for j in rows]
    progress = {s: statuses.count(s) for s in COUNTS}
    progress |= {"jobs": len(sweep.job_ids),
                 "fraction": round(sum(fractions) / len(fractions), 4) if fractions else 0.0}
    return SweepOut(id=sweep.id, name=sweep.name, created_at=sweep.created_at,
                    finished_at=sweep.finished_at, dataset_id=sweep.dataset_id, base=sweep.base,
                    grid=sweep.grid, metric=sweep.metric, status=status,
                    cancel_requested=sweep.cancel_requested, job_ids=list(sweep.job_ids),
                    progress=progress)


def get_or_404(db: Session, sweep_id: str) -> Sweep:
    sweep = db.get(Sweep, sweep_id.lower())
    if sweep is None:
        raise HTTPException(404, f"no sweep with id {sweep_id}")
    return sweep


@router.post("", status_code=202, response_model=SweepOut,
             responses={404: {"model": Error},
                        409: {"model": Error, "description": "the dataset is still ingesting, "
                              "or failed"},
                        503: {"model": Error, "description": "the broker is down"}},
             summary="Queue a sweep: one job per combination of the grid")
def create_sweep(body: SweepCreate, response: Response, db: Session = Depends(get_db),
                 settings: Settings = Depends(get_settings_dep)) -> SweepOut:
    try:  # every combination is checked as a POST /v1/jobs body (dataset_id included)
        bodies = sweeps.expand(body.base, body.grid, settings.max_sweep_jobs, schema=JobCreate)
    except sweeps.SweepError as e:
        raise HTTPException(e.status, str(e)) from None
    ds = dataset_or_404(db, body.base["dataset_id"])
    made: list[Sweep] = []

    def sweep_row(jobs: list[Job]) -> list[Sweep]:
        made.append(Sweep(name=body.name, dataset_id=ds.id, base=body.base, grid=body.grid,
                          metric=body.metric, job_ids=[j.id for j in jobs]))
        return made

    jobs = queue_jobs(db, ds, [JobCreate.model_validate(b) for b in bodies], settings,
                      with_rows=sweep_row, what="the sweep was")
    sweep = made[0]
    response.headers["Location"] = f"/v1/sweeps/{sweep.id}"
    return _out(sweep, {j.id: j for j in jobs})


@router.get("", response_model=SweepList, summary="List sweeps, newest first")
def list_sweeps(limit: int = Query(50, ge=1, le=500),
                offset: int = Query(0, ge=0, le=1_000_000_000),
                db: Session = Depends(get_db)) -> SweepList:
    total = db.scalar(select(func.count()).select_from(Sweep))
    rows = db.scalars(select(Sweep).order_by(Sweep.created_at.desc())
                      .limit(limit).offset(offset)).all()
    jobs = _jobs_of(db, [i for s in rows for i in s.job_ids])
    return SweepList(items=[_out(s, jobs) for s in rows], total=total, limit=limit,
                     offset=offset)


@router.get("/{sweep_id}", response_model=SweepOut, responses={404: {"model": Error}})
def get_sweep(sweep_id: str = uuid_path("sweep"), db: Session = Depends(get_db)) -> SweepOut:
    sweep = get_or_404(db, sweep_id)
    return _out(sweep, _jobs_of(db, sweep.job_ids))


@router.post("/{sweep_id}/cancel", response_model=SweepOut, responses={404: {"model": Error}},
             summary="Cancel a sweep: its queued jobs at once, its running ones at their next "
             "step; finished jobs are left as they are. Idempotent")
def cancel_sweep(sweep_id: str = uuid_path("sweep"), db: Session = Depends(get_db)) -> SweepOut:
    sweep = get_or_404(db, sweep_id)
    jobs = _jobs_of(db, sweep.job_ids)
    for job in jobs.values():
        if job.status in ("queued", "running"):
            request_cancel(job)
    sweep.cancel_requested = True
    db.commit()
    return _out(sweep, jobs)


def _board(db: Session, sweep_id: str, metric: str | None) -> tuple[Sweep, dict[str, Job], dict]:
    """The sweep, its jobs and its leaderboard (``sweeps.leaderboard``) ranked by ``metric``
    (default: the sweep's)."""
    sweep = get_or_404(db, sweep_id)
    metric = metric or sweep.metric
    if metric not in sweeps.METRICS:
        raise HTTPException(422, f"unknown metric '{metric}'; known metrics: "
                            f"{', '.join(sweeps.METRICS)}")
    jobs = _jobs_of(db, sweep.job_ids)
    history: dict[str, list[dict]] = {i: [] for i in jobs}
    if jobs:
        for rec in db.scalars(select(JobEpoch).where(JobEpoch.job_id.in_(list(jobs)))
                              .order_by(JobEpoch.job_id, JobEpoch.epoch)):
            history[rec.job_id].append(rec.record)
    board = sweeps.leaderboard(
        [{"id": j.id, "status": j.status, "config": j.config, "metrics": j.metrics or {},
          "clipping": j.clipping or {}, "started_at": j.started_at,
          "finished_at": j.finished_at, "history": history[j.id]}
         for i in sweep.job_ids if (j := jobs.get(i)) is not None],
        list(sweep.grid), metric)
    return sweep, jobs, board


def _csv(sweep: Sweep, board: dict) -> Response:
    return Response(sweeps.to_csv(board), media_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="sweep-{sweep.id}-{board["metric"]}.csv"'})


METRIC_QUERY = Query(None, description="ranking metric (default: the sweep's): "
                     + ", ".join(sweeps.METRICS))


@router.get("/{sweep_id}/leaderboard", response_model=Leaderboard,
            responses={404: {"model": Error}},
            summary="The sweep's settings ranked by a metric, mean and sd over their runs")
def get_sweep_leaderboard(sweep_id: str = uuid_path("sweep"), metric: str | None = METRIC_QUERY,
                          format: Literal["json", "csv"] = Query("json", include_in_schema=False),
                          db: Session = Depends(get_db)):
    # format=csv: the CSV operation's answer, for clients written before it had its own path
    sweep, jobs, board = _board(db, sweep_id, metric)
    if format == "csv":
        return _csv(sweep, board)
    return Leaderboard(sweep_id=sweep.id, status=_out(sweep, jobs).status, metrics={
        m: f"{desc} ({'higher' if d == 'max' else 'lower'} is better)"
        for m, (desc, d) in sweeps.METRICS.items()}, **board)


# response_class Response (no media type of its own): the errors stay documented as JSON
@router.get("/{sweep_id}/leaderboard.csv", response_class=Response,
            responses={404: {"model": Error}, 200: {
                "description": "one row per setting, best first: its grid values, runs, "
                "succeeded, failed, then each metric's mean and sd",
                "content": {"text/csv": {"schema": {"type": "string"}}}}},
            summary="The leaderboard as CSV")
def get_sweep_leaderboard_csv(sweep_id: str = uuid_path("sweep"),
                              metric: str | None = METRIC_QUERY,
                              db: Session = Depends(get_db)) -> Response:
    sweep, _, board = _board(db, sweep_id, metric)
    return _csv(sweep, board)
