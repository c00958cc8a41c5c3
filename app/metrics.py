"""Prometheus metrics of the API process, at ``GET /metrics``.

- request counts and latency by route template (``facegrad_http_*``), and identify/verify latency
  (``facegrad_identify_latency_seconds``) from an ASGI middleware;
- micro-batch sizes and forward-pass time of the identify batcher (``facegrad_identify_batch_*``,
  observed in :mod:`app.batcher`);
- read at scrape time: jobs by status, datasets and models (the database) and the queue depth
  (``LLEN`` of the Celery queue on Redis; jobs queued in the database with the embedded broker).

One API process per set of numbers: with ``serve --workers N`` each process answers for itself.
Training step times are the workers' (see :mod:`facegrad.service.worker_metrics`).
"""

from __future__ import annotations

import logging
import time

from fastapi import FastAPI, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from starlette.types import ASGIApp, Receive, Scope, Send

from facegrad.service.settings import Settings

log = logging.getLogger("facegrad.metrics")

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
IDENTIFY_ROUTES = {"/v1/identify": "identify", "/v1/verify": "verify"}

HTTP_REQUESTS = Counter("facegrad_http_requests_total", "HTTP requests answered, by route "
                        "template and status code", ["method", "route", "status"])
HTTP_LATENCY = Histogram("facegrad_http_request_duration_seconds", "Time from the request's "
                         "arrival to the end of its response, by route template",
                         ["method", "route"], buckets=LATENCY_BUCKETS)
IDENTIFY_LATENCY = Histogram("facegrad_identify_latency_seconds", "Time to answer an identify "
                             "or verify call (upload, decoding, detection, embedding, matching)",
                             ["endpoint"], buckets=LATENCY_BUCKETS)
BATCH_FACES = Histogram("facegrad_identify_batch_faces", "Faces embedded in one forward pass "
                        "of the identify micro-batcher",
                        buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
BATCH_REQUESTS = Histogram("facegrad_identify_batch_requests", "Identify/verify calls that "
                           "shared one forward pass", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64))
BATCH_SECONDS = Histogram("facegrad_identify_batch_seconds", "Forward-pass time of one "
                          "micro-batch", buckets=LATENCY_BUCKETS)


def route_label(scope: Scope) -> str:
    """The route template ('/v1/jobs/{job_id}'), 'PREFIX/*' for a mount, else 'unmatched'."""
    path = getattr(scope.get("route"), "path", None)
    if path:
        return path
    if scope.get("endpoint") is not None:  # a mounted app (static files): its prefix
        return f"{scope.get('root_path', '')}/*"
    return "unmatched"


class MetricsMiddleware:
    """Counts and times every HTTP request (route templates only: no unbounded label values)."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def tracking_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            elapsed = time.perf_counter() - start
            route = route_label(scope)
            method = scope.get("method", "")
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_LATENCY.labels(method, route).observe(elapsed)
            if route in IDENTIFY_ROUTES:
                IDENTIFY_LATENCY.labels(IDENTIFY_ROUTES[route]).observe(elapsed)


class StateCollector:
    """Numbers read when Prometheus scrapes: the database's jobs and the broker's queue."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self._redis = None

    def _queue_length(self) -> int:
        import redis

        from worker.celery_app import QUEUE

        if self._redis is None:
            self._redis = redis.Redis.from_url(self.settings.broker_url, socket_timeout=2,
                                               socket_connect_timeout=2)
        return int(self._redis.llen(QUEUE))

    def collect(self):
        from facegrad.service.db import Dataset, Job, Model, get_engine

        db_up = GaugeMetricFamily("facegrad_database_up",
                                  "1 when the database answered this scrape")
        jobs = GaugeMetricFamily("facegrad_jobs", "Jobs by status (database, read at scrape "
                                 "time)", labels=["status"])
        counts: dict[str, int] = {}
        try:
            with get_engine(self.settings.db_url).connect() as conn:
                counts = dict(conn.execute(select(Job.status, func.count())
                                           .group_by(Job.status)).all())
                n_datasets = conn.execute(select(func.count()).select_from(Dataset)).scalar()
                n_models = conn.execute(select(func.count()).select_from(Model)).scalar()
            db_up.add_metric([], 1)
        except Exception as e:  # a scrape must still answer; say what is missing
            log.warning("metrics: database unreadable (%s)", type(e).__name__)
            db_up.add_metric([], 0)
            n_datasets = n_models = None
        yield db_up
        if n_models is not None:
            for status in sorted(set(JOB_STATUSES) | set(counts)):
                jobs.add_metric([status], counts.get(status, 0))
            yield jobs
            yield GaugeMetricFamily("facegrad_datasets", "Datasets stored", value=n_datasets)
            yield GaugeMetricFamily("facegrad_models", "Trained models stored", value=n_models)

        depth = GaugeMetricFamily(
            "facegrad_queue_depth", "Training jobs waiting for a worker: LLEN of the Celery "
            "queue on Redis (source=redis), else jobs queued in the database (source=database)",
            labels=["source"])
        url = self.settings.broker_url or ""
        if url.startswith(("redis://", "rediss://")):
            try:
                depth.add_metric(["redis"], self._queue_length())
            except Exception as e:
                log.warning("metrics: broker unreadable (%s)", type(e).__name__)
                self._redis = None
        elif n_models is not None:
            depth.add_metric(["database"], counts.get("queued", 0))
        yield depth


def install(app: FastAPI, settings: Settings) -> None:
    """``GET /metrics`` and the request-counting middleware (call after the other middleware,
    so that requests they refuse, such as a 413 or 401, are counted too)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StateCollector(settings))

    def metrics() -> Response:  # sync: the collector queries the database in the threadpool
        body = generate_latest(REGISTRY) + generate_latest(registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
    app.add_middleware(MetricsMiddleware)
