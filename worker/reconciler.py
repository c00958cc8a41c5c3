"""Re-queues jobs the broker lost (a Redis restart keeps nothing) or whose worker died.

Every API process runs one; with several API replicas (docker compose, a load balancer) each
job is still re-published once per grace period: a reconciler first claims the job in SQL and
only the one whose claim succeeded sends the message.
"""

from __future__ import annotations

import logging
import threading
from datetime import timedelta

from sqlalchemy import or_, update

from facegrad.service.db import Job, session_scope, utcnow
from facegrad.service.jobs import jobs_to_requeue
from facegrad.service.settings import Settings
from worker.queue import BrokerUnavailable, broker_holds, publish_job

log = logging.getLogger("facegrad.reconciler")


def claim(settings: Settings, job_id: str, grace_seconds: float) -> bool:
    """Stamp the job as sent now unless another reconciler did within ``grace_seconds``.

    One conditional UPDATE, so of several reconcilers that found the same job in the same pass
    exactly one gets True and publishes it.
    """
    now = utcnow()
    with session_scope(settings.db_url) as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, or_(Job.enqueued_at.is_(None),
                                         Job.enqueued_at < now - timedelta(seconds=grace_seconds)))
            .values(enqueued_at=now))
        return res.rowcount == 1


def _unclaim(settings: Settings, job_id: str) -> None:
    """No message went out: the next pass (of any reconciler) may try again at once."""
    with session_scope(settings.db_url) as s:
        s.execute(update(Job).where(Job.id == job_id).values(enqueued_at=None))


def reconcile_once(settings: Settings, grace_seconds: float = 15.0) -> list[str]:
    """One pass; returns the ids re-published."""
    dead, waiting = jobs_to_requeue(settings, grace_seconds)
    if not dead and not waiting:
        return []
    held = broker_holds(waiting) if waiting else set()
    sent = []
    for job_id in dead + [j for j in waiting if j not in held]:
        if not claim(settings, job_id, grace_seconds):
            continue  # another API process's reconciler sent it
        try:
            publish_job(job_id)
        except BrokerUnavailable:
            _unclaim(settings, job_id)
            log.warning("broker down; job %s stays queued in the database until it is back", job_id)
            break
        sent.append(job_id)
        log.info("re-queued job %s", job_id)
    return sent


class Reconciler(threading.Thread):
    def __init__(self, settings: Settings):
        super().__init__(daemon=True, name="reconciler")
        self.settings = settings
        self._done = threading.Event()  # not _stop: a Thread method of that name runs after fork

    def run(self) -> None:
        while not self._done.wait(self.settings.reconcile_interval_seconds):
            try:
                reconcile_once(self.settings, grace_seconds=max(
                    5.0, 1.5 * self.settings.reconcile_interval_seconds))
            except Exception:
                log.exception("reconcile pass failed")

    def stop(self) -> None:
        self._done.set()
