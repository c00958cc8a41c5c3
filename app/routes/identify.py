"""Identify the faces in uploaded images, and verify whether two photos show the same person."""

from __future__ import annotations

import asyncio
import functools
from typing import Literal

import numpy as np
from fastapi import APIRouter, Depends, File, Form, HTTPException, Request, UploadFile
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.auth import identify_or_admin
from app.deps import get_settings_dep
from app.faces import faces_of_upload
from app.schemas import Detect, Error, IdentifyOut, IdentifyResult, VerifyOut
from facegrad.service.db import Model, session_scope
from facegrad.service.settings import Settings

router = APIRouter(prefix="/v1", tags=["identify"], dependencies=[Depends(identify_or_admin)])
# 409: the model was written by an earlier version and must be retrained (app.main)
ERRORS = {404: {"model": Error}, 409: {"model": Error}, 413: {"model": Error},
          415: {"model": Error}}


def pick_model(db: Session, model_id: str | None) -> Model:
    """The model with this (normalised) id, else the newest; the read transaction is ended
    before the row is returned, so the connection goes back to the pool at once."""
    if model_id:
        m = db.get(Model, model_id)
        if m is None:
            raise HTTPException(404, f"no model with id {model_id}")
    else:
        m = db.scalars(select(Model).order_by(Model.created_at.desc()).limit(1)).first()
        if m is None:
            raise HTTPException(404, "no trained model yet: train one with POST /v1/jobs")
    db.commit()  # ends the read transaction; attributes stay loaded (expire_on_commit=False)
    return m


def prepare(request: Request, settings: Settings, model_id: str | None,
            files: list[UploadFile], detect: str | None, max_faces: int):
    """The blocking part of a call, in one worker-thread hop: pick and load the model, then
    decode each file and find its faces → (model row, loaded model, [(name, faces, note)]).

    The database session lives only here: a request-scoped one (``get_db``, a generator
    dependency) cost two more thread-pool hops per call, to open and to close it.
    """
    key = model_id.strip().lower() if model_id else None

    def lookup() -> Model:
        with session_scope(settings.db_url) as db:
            return pick_model(db, key)

    m = request.app.state.model_rows.get(key, lookup)
    lm = request.app.state.models.get(m.id, m.path, m.gallery_version)
    per_file = [(f.filename or "", *faces_of_upload(f, settings, detect or m.detect, max_faces))
                for f in files]
    return m, lm, per_file


async def _prepare(request: Request, *args):
    """:func:`prepare` on the app's small decode pool (``app.state.decode_pool``).

    Decoding and the model lookup are CPU work under Python's global lock: with one thread per
    core, 32 concurrent calls queue there instead of 32 threads fighting over the lock (and
    over the CPU the forward pass needs).
    """
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(request.app.state.decode_pool,
                                      functools.partial(prepare, request, *args))


@router.post("/identify", response_model=IdentifyOut, responses=ERRORS,
             summary="Who is in these images? One result per file, in order")
async def identify(
    request: Request,
    file: list[UploadFile] = File(description="one or more images"),
    model_id: str | None = Form(None, pattern=r"^[0-9a-fA-F-]{36}$",
                                description="default: the newest model"),
    top_k: int = Form(5, ge=1, le=100),
    threshold: float | None = Form(None, ge=-1, le=1, description="score (the best "
                                   "identity's cosine similarity: the face's confidence) below "
                                   "which a face is 'unknown'; default: the model's "
                                   "calibrated"),
    detect: Detect | None = Form(None, description="default: the model's"),
    max_faces: int = Form(10, ge=1, le=100),
    settings: Settings = Depends(get_settings_dep),
) -> IdentifyOut:
    if len(file) > settings.max_identify_files:
        raise HTTPException(413, f"{len(file)} files sent; at most "
                            f"{settings.max_identify_files} per call (FACEGRAD_MAX_IDENTIFY_FILES)")
    m, lm, per_file = await _prepare(request, settings, model_id, file, detect, max_faces)
    crops = [crop for _, faces, _ in per_file for _, crop in faces]
    matches = []
    if crops:
        _, sims, labels = await request.app.state.batcher.embed(lm, np.stack(crops), top_k)
        matches = lm.match_scores(sims, labels, top_k, threshold)
    results, i = [], 0
    for name, faces, note in per_file:
        out = []
        for box, _ in faces:
            identity, conf, cands = matches[i]
            i += 1
            out.append({"box": box, "identity": identity, "confidence": conf,
                        "candidates": [{"identity": c, "confidence": s} for c, s in cands]})
        results.append(IdentifyResult(filename=name, faces=out, note=note))
    thr = lm.threshold if threshold is None else threshold
    return IdentifyOut(model_id=m.id, threshold=thr, results=results)


@router.post("/verify", response_model=VerifyOut, responses=ERRORS,
             summary="Do two photos show the same person?")
async def verify(
    request: Request,
    file: list[UploadFile] = File(description="exactly two images"),
    model_id: str | None = Form(None, pattern=r"^[0-9a-fA-F-]{36}$"),
    threshold: float | None = Form(None, ge=-1, le=1, description="cosine similarity at or "
                                   "above which the two faces are the same person when they "
                                   "are compared by similarity; default: the model's "
                                   "calibrated verification threshold"),
    compare: Literal["auto", "similarity"] = Form(
        "auto", description="'auto': when both faces are identified as enrolled people (each "
        "clears the model's identify threshold), the answer follows their identities; "
        "otherwise the similarity decides. 'similarity': the similarity always decides."),
    detect: Detect | None = Form(None),
    settings: Settings = Depends(get_settings_dep),
) -> VerifyOut:
    if len(file) != 2:
        raise HTTPException(422, f"send exactly two files in the 'file' field ({len(file)} sent)")
    m, lm, per_file = await _prepare(request, settings, model_id, file, detect, 1)
    crops = []
    for name, faces, _ in per_file:
        if not faces:
            raise HTTPException(422, f"no face found in {name!r}")
        crops.append(faces[0][1])
    emb, sims, labels = await request.app.state.batcher.embed(lm, np.stack(crops), 1)
    return VerifyOut(model_id=m.id, **lm.verify_scores(emb, sims, labels, threshold, compare))
