"""Celery tasks: thin glue from a broker message to facegrad.jobs.run_job."""

from __future__ import annotations

import os
import socket

from facegrad.jobs import run_job
from facegrad.settings import get_settings
from worker.celery_app import TASK_RUN_JOB, celery_app


@celery_app.task(name=TASK_RUN_JOB, acks_late=True, ignore_result=True)
def run_job_task(job_id: str) -> str:
    return run_job(get_settings(), job_id, owner=f"{socket.gethostname()}:{os.getpid()}")
