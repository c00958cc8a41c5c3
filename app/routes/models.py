"""Trained models: list, read, download weights, and enrollment of identities."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.auth import admin_only, identify_or_admin
from app.deps import get_db, get_settings_dep
from app.faces import faces_of_upload
from app.schemas import Error, IdentityList, ModelList, ModelOut
from app.uploads import uuid_path
from facegrad.service.db import Model
from facegrad.service.settings import Settings

router = APIRouter(prefix="/v1/models", tags=["models"])


def to_out(m: Model) -> ModelOut:
    size = m.preprocessing.get("image_size", 64)
    return ModelOut(id=m.id, job_id=m.job_id, dataset_id=m.dataset_id, created_at=m.created_at,
                    architecture=m.architecture, input_size=[size, size, 3], labels=m.labels,
                    metrics=m.metrics, config=m.config, clip=m.config.get("clip", {}),
                    preprocessing=m.preprocessing, threshold=m.threshold, open_set=m.open_set,
                    detect=m.detect, privacy=(m.metrics or {}).get("privacy"))


def get_or_404(db: Session, model_id: str) -> Model:
    m = db.get(Model, model_id)
    if m is None:
        raise HTTPException(404, f"no model with id {model_id}")
    return m


def loaded(request: Request, m: Model):
    return request.app.state.models.get(m.id, m.path, m.gallery_version)


@router.get("", response_model=ModelList, dependencies=[Depends(identify_or_admin)])
def list_models(limit: int = Query(50, ge=1, le=500),
                offset: int = Query(0, ge=0, le=1_000_000_000),
                db: Session = Depends(get_db)) -> ModelList:
    total = db.scalar(select(func.count()).select_from(Model))
    rows = db.scalars(select(Model).order_by(Model.created_at.desc())
                      .limit(limit).offset(offset)).all()
    return ModelList(items=[to_out(m) for m in rows], total=total)


@router.get("/{model_id}", response_model=ModelOut, responses={404: {"model": Error}},
            dependencies=[Depends(identify_or_admin)])
def get_model(model_id: str = uuid_path("model"), db: Session = Depends(get_db)) -> ModelOut:
    return to_out(get_or_404(db, model_id))


@router.get("/{model_id}/weights", response_class=FileResponse,
            responses={404: {"model": Error}, 200: {
                "description": "the safetensors file",
                "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}}},
            dependencies=[Depends(admin_only)], summary="The model's safetensors file")
def get_model_weights(
        model_id: str = uuid_path("model"),
        part: Literal["model", "network"] = Query(
            "model", description="'model' (default): the whole file, the network, its "
            "classifier head and the gallery (every enrolled photo's descriptor); 'network': "
            "the embedding network's weights only, without the gallery and without the head "
            "(one row per trained person), e.g. to share a model trained with privacy, whose "
            "guarantee covers the network but not the gallery (docs/privacy.md)"),
        db: Session = Depends(get_db)):
    m = get_or_404(db, model_id)
    path = Path(m.path).with_suffix(".safetensors")
    if not path.is_file():
        raise HTTPException(404, "the model's weights file is missing on the server")
    if part == "model":
        return FileResponse(path, media_type="application/octet-stream",
                            filename=f"facegrad-{m.id}.safetensors")
    from safetensors import safe_open
    from safetensors.torch import save

    with safe_open(str(path), framework="pt") as f:
        network = {k: f.get_tensor(k) for k in f.keys()
                   if k.startswith("model.") and not k.startswith("model.classifier.")}
    return Response(save(network, metadata={"facegrad_model": m.id, "part": "network"}),
                    media_type="application/octet-stream", headers={
                        "Content-Disposition":
                            f'attachment; filename="facegrad-{m.id}-network.safetensors"'})


@router.get("/{model_id}/identities", response_model=IdentityList,
            responses={404: {"model": Error}}, dependencies=[Depends(identify_or_admin)])
def list_identities(request: Request, model_id: str = uuid_path("model"),
                    db: Session = Depends(get_db)) -> IdentityList:
    m = get_or_404(db, model_id)
    g = loaded(request, m).gallery
    return IdentityList(model_id=m.id, identities=dict(zip(g.labels, map(int, g.counts))))


@router.post("/{model_id}/identities", response_model=IdentityList, status_code=201,
             responses={404: {"model": Error}, 409: {"model": Error}, 413: {"model": Error},
                        415: {"model": Error}},
             dependencies=[Depends(admin_only)],
             summary="Enroll a person (or add images to one) without retraining")
def enroll(request: Request, model_id: str = uuid_path("model"),
           identity: str = Form(min_length=1, max_length=128, pattern=r"^[^\x00-\x1f/\\]+$"),
           file: list[UploadFile] = File(description="one or more face images"),
           db: Session = Depends(get_db), settings: Settings = Depends(get_settings_dep)):
    m = get_or_404(db, model_id)
    lm = loaded(request, m)
    crops = []
    for f in file[: settings.max_identify_files + 1]:
        faces, _ = faces_of_upload(f, settings, m.detect, max_faces=1)
        if not faces:
            raise HTTPException(422, f"no face found in {f.filename!r}; send a photo with a "
                                "visible frontal face")
        crops.append(faces[0][1])
    if len(file) > settings.max_identify_files:
        raise HTTPException(413, f"at most {settings.max_identify_files} images per call "
                            "(FACEGRAD_MAX_IDENTIFY_FILES)")
    emb = lm.embed(np.stack(crops))
    # the gallery as saved, edited under its files' lock; the row's version is committed
    # before the lock is released, so processes see versions in the order they were written
    with request.app.state.gallery_lock, lm.edit_gallery() as g:
        db.refresh(m)
        g.enroll(identity.strip(), emb)
        g.save(Path(m.path).parent)
        m.gallery_version = g.version
        db.commit()
        request.app.state.model_rows.clear()
    return IdentityList(model_id=m.id, identities=dict(zip(g.labels, map(int, g.counts))))


@router.delete("/{model_id}/identities/{identity}", response_model=IdentityList,
               responses={404: {"model": Error}, 409: {"model": Error}},
               dependencies=[Depends(admin_only)])
def remove_identity(request: Request, identity: str, model_id: str = uuid_path("model"),
                    db: Session = Depends(get_db)) -> IdentityList:
    m = get_or_404(db, model_id)
    lm = loaded(request, m)
    with request.app.state.gallery_lock, lm.edit_gallery() as g:
        if identity not in g.labels:
            raise HTTPException(404, f"model {m.id} has no identity {identity!r}")
        g.remove(identity)
        g.save(Path(m.path).parent)
        m.gallery_version = g.version
        db.commit()
        request.app.state.model_rows.clear()
    return IdentityList(model_id=m.id, identities=dict(zip(g.labels, map(int, g.counts))))
