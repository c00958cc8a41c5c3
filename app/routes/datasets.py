"""Upload, list, read and delete face datasets.

An upload is checked and saved in the request, then ingested (decoded, faces detected and
aligned, stored) in the background by the API process's IngestRunner (facegrad/service/ingest.py
says why there and not on a worker); the request waits for it up to FACEGRAD_UPLOAD_WAIT_SECONDS.
"""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

from fastapi import (
    APIRouter,
    Depends,
    File,
    Form,
    HTTPException,
    Query,
    Request,
    Response,
    UploadFile,
)
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth import admin_only
from app.deps import get_db, get_settings_dep
from app.schemas import DatasetList, DatasetOut, Detect, Error
from app.uploads import spool_upload, uuid_path
from facegrad.data.archive import DatasetError
from facegrad.service.db import Dataset, Job
from facegrad.service.ingest import (
    check_upload,
    clear_files,
    lease_until,
    limits_from,
    save_upload,
    upload_path,
)
from facegrad.service.settings import Settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], dependencies=[Depends(admin_only)])
ERRORS = {400: {"model": Error}, 413: {"model": Error}, 415: {"model": Error}}


def to_out(d: Dataset) -> DatasetOut:
    progress = d.progress or {}
    if not progress and d.status == "ready":  # stored before ingests reported progress
        progress = {"done": d.num_images + len(d.rejected or {}),
                    "total": d.num_images + len(d.rejected or {})}
    return DatasetOut(id=d.id, name=d.name, created_at=d.created_at, status=d.status,
                      progress={"done": progress.get("done", 0),
                                "total": progress.get("total", 0)},
                      error=d.error, num_identities=d.num_identities, num_images=d.num_images,
                      identities=d.identities or {}, rejected=d.rejected or {}, detect=d.detect,
                      source_format=d.source_format,
                      warnings=(d.info or {}).get("warnings", []))


def requested_wait(prefer: str | None, cap: float) -> tuple[float, bool]:
    """(seconds to wait for the ingest, whether 'respond-async' was asked) from an RFC 7240
    ``Prefer`` header: ``respond-async`` answers at once, ``wait=N`` waits at most N seconds;
    never longer than ``cap`` (FACEGRAD_UPLOAD_WAIT_SECONDS)."""
    wait, is_async = cap, False
    for pref in (prefer or "").split(","):
        token = pref.split(";")[0].strip().lower()
        if token == "respond-async":
            is_async = True
        elif token.startswith("wait="):
            try:
                wait = min(wait, max(0.0, float(token[5:])))
            except ValueError:
                pass
    return (0.0 if is_async else wait), is_async


@router.post(
    "", status_code=202, response_model=DatasetOut,
    responses={**ERRORS, 201: {"model": DatasetOut, "description": "Ingested while the request "
                               "waited: the dataset is ready"}},
    summary="Upload a labelled face dataset (.zip of identity folders, or .npz)",
    description="The upload is received and checked at once (size, archive structure, unsafe "
    "members, limits, .npz headers and labels: a 4xx says what to fix), saved, and then "
    "ingested in the background: each image decoded, its face detected and aligned. The "
    "request waits for the ingest up to FACEGRAD_UPLOAD_WAIT_SECONDS (10): done by then, it "
    "answers 201 with the dataset `ready` (or the 4xx of a dataset that cannot be used, which "
    "is then not kept); else 202 with the dataset `ingesting` and `Location: "
    "/v1/datasets/{id}`, to poll until `status` is `ready` or `failed` (`error` says why). "
    "Send `Prefer: respond-async` for the 202 at once, or `Prefer: wait=N` to wait at most N "
    "seconds.")
def upload_dataset(
    request: Request,
    response: Response,
    file: UploadFile = File(description=".zip with one folder per identity, or .npz with "
                        "'images' (N,H,W[,C] uint8) and 'labels' (N,)"),
    name: str | None = Form(None, max_length=200, pattern=r"^[^\x00-\x1f\x7f]*$",
                            description="default: the file name without its extension"),
    detect: Detect = Form(
        "auto", description="'auto' (default) finds the face in each image and crops it (the "
        "whole image when it already is a face crop); 'none' uses the whole image. Models "
        "trained on the dataset apply the same choice at identify time."),
    db: Session = Depends(get_db), settings: Settings = Depends(get_settings_dep),
) -> DatasetOut:
    runner = request.app.state.ingest
    limits = limits_from(settings)
    fname = (file.filename or "").lower()
    kind = "zip" if fname.endswith(".zip") else "npz" if fname.endswith(".npz") else None
    tmp = spool_upload(file, settings, limits.max_upload_bytes)
    try:
        if kind is None:  # sniff the content when the name says nothing
            with open(tmp, "rb") as f:
                kind = "zip" if f.read(4) == b"PK\x03\x04" else None
        if kind is None:
            raise HTTPException(415, "upload a .zip (one folder per identity) or a .npz with "
                                "'images' and 'labels' arrays")
        try:
            counts = check_upload(tmp, kind, limits)
        except DatasetError as e:
            raise HTTPException(e.status, e.reason) from e
        default = "".join(ch for ch in Path(file.filename or "").stem if ch.isprintable())
        ds = Dataset(name=name or default[:200] or "dataset", status="ingesting",
                     progress={"done": 0, "total": sum(counts.values())}, num_images=0,
                     num_identities=0, identities={}, rejected={}, detect=detect,
                     source_format=kind, info={}, ingest_owner=runner.owner,
                     ingest_expires=lease_until(settings), ingest_attempts=1)
        db.add(ds)
        db.flush()
        try:
            save_upload(tmp, upload_path(settings, ds.id, kind))
            db.commit()  # the row and the saved upload: from here the ingest survives restarts
        except BaseException:
            clear_files(settings, ds.id)
            raise
    finally:
        tmp.unlink(missing_ok=True)
    out = to_out(ds)
    future = runner.submit(ds.id)
    response.headers["Location"] = f"/v1/datasets/{ds.id}"
    wait, is_async = requested_wait(request.headers.get("prefer"), settings.upload_wait_seconds)
    if is_async:
        response.headers["Preference-Applied"] = "respond-async"
    try:
        future.result(timeout=wait)
    except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
        return out  # 202: still ingesting (here, or after a restart when this process stops)
    db.expire_all()
    ds = db.get(Dataset, out.id)
    if ds.status == "ready":
        response.status_code = 201
    elif ds.status == "failed":
        # refused as a whole while the client waited: answered as the 4xx it is, nothing kept
        status = int((ds.info or {}).get("error_status", 422))
        reason = ds.error
        db.delete(ds)
        db.commit()
        clear_files(settings, out.id)
        raise HTTPException(status, reason)
    return to_out(ds)


@router.get("", response_model=DatasetList, summary="List datasets, newest first")
def list_datasets(limit: int = Query(50, ge=1, le=500),
                  offset: int = Query(0, ge=0, le=1_000_000_000),
                  db: Session = Depends(get_db)) -> DatasetList:
    total = db.scalar(select(func.count()).select_from(Dataset))
    rows = db.scalars(select(Dataset).order_by(Dataset.created_at.desc())
                      .limit(limit).offset(offset)).all()
    return DatasetList(items=[to_out(d) for d in rows], total=total)


def get_or_404(db: Session, dataset_id: str) -> Dataset:
    ds = db.get(Dataset, dataset_id)
    if ds is None:
        raise HTTPException(404, f"no dataset with id {dataset_id}")
    return ds


@router.get("/{dataset_id}", response_model=DatasetOut, responses={404: {"model": Error}})
def get_dataset(dataset_id: str = uuid_path("dataset"), db: Session = Depends(get_db)):
    return to_out(get_or_404(db, dataset_id))


@router.delete("/{dataset_id}", status_code=204,
               responses={404: {"model": Error}, 409: {"model": Error}},
               summary="Delete a dataset (409 while it is ingesting, or a queued or running "
               "job uses it)")
def delete_dataset(dataset_id: str = uuid_path("dataset"), db: Session = Depends(get_db),
                   settings: Settings = Depends(get_settings_dep)) -> None:
    ds = get_or_404(db, dataset_id)
    if ds.status == "ingesting":
        raise HTTPException(409, "the dataset is still ingesting; delete it once its status is "
                            "ready or failed")
    busy = db.scalar(select(func.count()).select_from(Job).where(
        Job.dataset_id == ds.id, Job.status.in_(("queued", "running"))))
    if busy:
        raise HTTPException(409, f"dataset is used by {busy} queued or running job(s); "
                            "cancel them or wait until they end")
    db.delete(ds)
    db.flush()
    clear_files(settings, ds.id)
