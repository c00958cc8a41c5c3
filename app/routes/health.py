"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from app.schemas import Health, Readiness
from facegrad.service.db import get_engine
from worker.queue import broker_ok

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="The process is up")
def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", response_model=Readiness, summary="The database and the broker answer",
            responses={503: {"model": Readiness,
                             "description": "not ready: names the part that does not answer"}})
def readyz(request: Request):
    settings = request.app.state.settings
    checks = {}
    try:
        with get_engine(settings.db_url).connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:
        checks["database"] = f"database unreachable: {type(e).__name__}"
    ok, msg = broker_ok()
    checks["broker"] = msg
    bad = [k for k, v in checks.items() if v != "ok"]
    if bad:
        return JSONResponse({"status": "unavailable", "detail": f"not ready: {', '.join(bad)} "
                             "does not answer", "checks": checks}, status_code=503)
    return {"status": "ready", "checks": checks}
