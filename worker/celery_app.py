"""The Celery application: broker from settings (Redis, or the embedded SQLite broker)."""

from __future__ import annotations

from celery import Celery

from facegrad.service.settings import get_settings

QUEUE = "facegrad"
TASK_RUN_JOB = "facegrad.run_job"


def make_celery() -> Celery:
    settings = get_settings()
    app = Celery("facegrad", broker=settings.celery_broker_url, include=["worker.tasks"])
    # Redis: redelivery of a dead worker's job is the lease + reconciler's work, not this
    # timeout's. The embedded SQLite transport hands its options to create_engine: none there.
    transport = {} if settings.embedded_broker else {"visibility_timeout": 6 * 3600}
    app.conf.update(
        task_default_queue=QUEUE,
        task_acks_late=True,  # a job is acknowledged when it ends, so a lost worker's job returns
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        broker_connection_timeout=3,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_enable_remote_control=not settings.embedded_broker,
    )
    return app


celery_app = make_celery()
