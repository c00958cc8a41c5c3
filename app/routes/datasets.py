"""Upload, list, read and delete face datasets."""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, UploadFile
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth import admin_only
from app.deps import get_db, get_settings_dep
from app.schemas import DatasetList, DatasetOut, Detect, Error
from app.uploads import spool_upload, uuid_path
from facegrad.data.archive import DatasetError, Limits
from facegrad.data.datasets import build_from_npz, build_from_zip
from facegrad.data.imageio import ImageError
from facegrad.recognition.detect import crop_one
from facegrad.service import storage
from facegrad.service.db import Dataset, Job
from facegrad.service.settings import Settings

router = APIRouter(prefix="/v1/datasets", tags=["datasets"], dependencies=[Depends(admin_only)])
ERRORS = {400: {"model": Error}, 413: {"model": Error}, 415: {"model": Error}}


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


def to_out(d: Dataset) -> DatasetOut:
    return DatasetOut(id=d.id, name=d.name, created_at=d.created_at,
                      num_identities=d.num_identities, num_images=d.num_images,
                      identities=d.identities, rejected=d.rejected, detect=d.detect,
                      source_format=d.source_format, warnings=d.info.get("warnings", []))


@router.post("", status_code=201, response_model=DatasetOut, responses=ERRORS,
             summary="Upload a labelled face dataset (.zip of identity folders, or .npz)")
def upload_dataset(
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
        kw = {"crop": face_cropper(kind)} if detect == "auto" else {}
        try:
            report = (build_from_zip if kind == "zip" else build_from_npz)(tmp, limits, **kw)
        except (DatasetError, ImageError) as e:
            raise HTTPException(e.status, e.reason) from e
        default = "".join(ch for ch in Path(file.filename or "").stem if ch.isprintable())
        ds = Dataset(name=name or default[:200] or "dataset",
                     num_images=int(report.arrays.images.shape[0]),
                     num_identities=len(report.identities), identities=report.identities,
                     rejected=report.rejected, detect=detect, source_format=kind,
                     info=report.info)
        db.add(ds)
        db.flush()
        report.arrays.save(storage.dataset_dir(settings, ds.id))
        db.commit()
        return to_out(ds)
    finally:
        tmp.unlink(missing_ok=True)


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
               summary="Delete a dataset (409 while a queued or running job uses it)")
def delete_dataset(dataset_id: str = uuid_path("dataset"), db: Session = Depends(get_db),
                   settings: Settings = Depends(get_settings_dep)) -> None:
    ds = get_or_404(db, dataset_id)
    busy = db.scalar(select(func.count()).select_from(Job).where(
        Job.dataset_id == ds.id, Job.status.in_(("queued", "running"))))
    if busy:
        raise HTTPException(409, f"dataset is used by {busy} queued or running job(s); "
                            "cancel them or wait until they end")
    db.delete(ds)
    db.flush()
    shutil.rmtree(storage.dataset_dir(settings, ds.id), ignore_errors=True)
