"""Celery tasks: thin glue from a broker message to facegrad.service.jobs.run_job."""

from __future__ import annotations

import os
import socket

from facegrad.service.jobs import mark_enqueued, run_job
from facegrad.service.settings import get_settings
from worker.celery_app import TASK_RUN_JOB, celery_app
from worker.queue import BrokerUnavailable, publish_job


@celery_app.task(name=TASK_RUN_JOB, acks_late=True, ignore_result=True)
def run_job_task(job_id: str) -> str:
    settings = get_settings()
    status = run_job(settings, job_id, owner=f"{socket.gethostname()}:{os.getpid()}")
    if status == "retry":  # queued again in the database; the reconciler sends it if this fails
        try:
            publish_job(job_id)
            mark_enqueued(settings, job_id)
        except BrokerUnavailable:
            pass
    return status
