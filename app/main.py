"""The FastAPI application: routers, limits, auth set-up and background parts."""

from __future__ import annotations

import gc
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse

from app import metrics, openapi
from app.auth import APIKeyGate, parse_keys
from app.batcher import Batcher
from app.model_cache import ModelCache, RecentRows
from app.routes import clip_modes, console, datasets, health, identify, jobs, models, sweeps
from app.uploads import BodyLimit
from facegrad.recognition.inference import UnsupportedModel
from facegrad.service.db import get_engine
from facegrad.service.ingest import IngestRunner
from facegrad.service.settings import Settings, get_settings

log = logging.getLogger("facegrad.api")
API_VERSION = "1.0.0"


async def unsupported_model(request: Request, exc: UnsupportedModel) -> JSONResponse:
    """409 for a stored model this version cannot load (written by an earlier one): its
    message says to retrain."""
    return JSONResponse({"detail": str(exc)}, status_code=409)


def create_app(settings: Settings | None = None, reconcile: bool = True) -> FastAPI:
    settings = settings or get_settings()
    try:
        api_keys = parse_keys(settings.api_keys)
    except ValueError as e:  # one clear line at start-up rather than a traceback
        log.critical("cannot start: %s", e)
        raise SystemExit(f"facegrad: cannot start: {e}") from None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        get_engine(settings.db_url)  # creates tables
        if not api_keys:
            log.warning("no FACEGRAD_API_KEYS set: the API is OPEN to anyone who can reach "
                        "%s:%s", settings.host, settings.port)
        app.state.batcher.start()
        app.state.ingest.start()  # also resumes the ingests a stopped process left behind
        reconciler = None
        if reconcile:
            from worker.reconciler import Reconciler

            reconciler = Reconciler(settings)
            reconciler.start()
        # the start-up objects (modules, schemas, routes) never die: frozen out of the garbage
        # collector's sight, its full collections no longer walk them in the middle of requests
        gc.collect()
        gc.freeze()
        yield
        await app.state.batcher.stop()
        app.state.ingest.stop()
        app.state.decode_pool.shutdown(wait=False, cancel_futures=True)
        if reconciler:
            reconciler.stop()

    app = FastAPI(
        title="facegrad",
        version=API_VERSION,
        description="Train face-recognition models with controlled gradient clipping, and "
        "identify faces. Every error is `{\"detail\": ...}` (the `Error` schema) with a 4xx "
        "status that says what to fix. Send `X-API-Key` when the server has keys configured.",
        lifespan=lifespan,
        generate_unique_id_function=openapi.operation_id,
    )
    app.state.settings = settings
    app.state.api_keys = api_keys
    app.state.models = ModelCache()
    app.state.model_rows = RecentRows()
    app.state.batcher = Batcher(settings.identify_batch_wait_ms, settings.identify_max_batch)
    app.state.decode_pool = ThreadPoolExecutor(max(1, min(4, os.cpu_count() or 1)),
                                               thread_name_prefix="decode")
    app.state.gallery_lock = threading.Lock()
    app.state.ingest = IngestRunner(settings)  # uploads are ingested in this process

    app.include_router(health.router)
    for r in (datasets.router, jobs.router, clip_modes.router, sweeps.router, models.router,
              identify.router):
        app.include_router(r, responses=openapi.V1_ERRORS)
    openapi.install(app)

    if api_keys:  # 401 before the body is read; inside CORS so that a 401 carries its headers
        app.add_middleware(APIKeyGate, keys=api_keys)
    origins = [o.strip() for o in settings.cors_origins.split(",") if o.strip()]
    if origins:
        app.add_middleware(CORSMiddleware, allow_origins=origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(BodyLimit, max_bytes=settings.max_upload_bytes, slack=1024 * 1024)
    metrics.install(app, settings)  # GET /metrics; its middleware outermost, so it counts all

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")}
                  for e in exc.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    app.add_exception_handler(UnsupportedModel, unsupported_model)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"detail": "internal server error; the server log has the details"},
                            status_code=500)

    console.install(app)  # the web console at / (static files, plotly.js from the wheel)

    return app
