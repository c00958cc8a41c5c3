"""Prometheus metrics of a training worker, served on FACEGRAD_WORKER_METRICS_PORT when set.

The worker runs jobs in its own process (Celery's solo pool), so these counters are the worker's:
scrape each worker on its port. Step time per epoch is the epoch's wall time (validation
included) over its optimizer steps; the same numbers are in each job's epoch records
(``epoch_seconds``) at ``GET /v1/jobs/{id}/metrics``.
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger("facegrad.service.worker_metrics")

STEP_SECONDS = Histogram(
    "facegrad_train_step_seconds", "Mean time of one training step over an epoch (epoch wall "
    "time, validation included, divided by its steps)", ["architecture"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0))
EPOCH_SECONDS = Histogram(
    "facegrad_train_epoch_seconds", "Wall time of one training epoch, validation included",
    ["architecture"], buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600))
EPOCHS = Counter("facegrad_train_epochs_total", "Training epochs completed", ["architecture"])
STEPS = Counter("facegrad_train_steps_total", "Optimizer steps taken (skipped ones included)",
                ["clip_mode"])
CLIPPED = Counter("facegrad_train_clipped_steps_total", "Steps where gradient clipping fired",
                  ["clip_mode"])
SKIPPED = Counter("facegrad_train_skipped_steps_total", "Steps skipped for a non-finite "
                  "gradient", ["clip_mode"])
JOBS = Counter("facegrad_worker_jobs_total", "Job deliveries handled by this worker, by the "
               "status they left the job in", ["status"])
BUSY = Gauge("facegrad_worker_busy", "1 while this worker runs a job")


def observe_epoch(record: dict, config: dict) -> None:
    """Record one epoch (a record as stored in the job's history)."""
    arch = str(config.get("architecture", "unknown"))
    mode = str((config.get("clip") or {}).get("mode", "unknown"))
    clip = record.get("clipping") or {}
    steps = int(clip.get("steps") or 0)
    seconds = float(record.get("epoch_seconds") or 0.0)
    EPOCHS.labels(arch).inc()
    EPOCH_SECONDS.labels(arch).observe(seconds)
    if steps:
        STEP_SECONDS.labels(arch).observe(seconds / steps)
    STEPS.labels(mode).inc(steps)
    CLIPPED.labels(mode).inc(int(clip.get("clipped_steps") or 0))
    SKIPPED.labels(mode).inc(int(clip.get("skipped_steps") or 0))


def serve(port: int | None, host: str = "127.0.0.1") -> bool:
    """Expose this process's metrics on ``host:port``; False (and a warning) if it cannot."""
    if not port:
        return False
    try:
        start_http_server(port, addr=host)
    except OSError as e:  # a second worker on the same host and port: train anyway
        log.warning("worker metrics not served on %s:%s (%s); set a distinct "
                    "FACEGRAD_WORKER_METRICS_PORT per worker", host, port, e)
        return False
    log.info("worker metrics on http://%s:%s/metrics", host, port)
    return True
