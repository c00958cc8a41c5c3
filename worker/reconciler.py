"""Re-queues jobs the broker lost (a Redis restart keeps nothing) or whose worker died."""

from __future__ import annotations

import logging
import threading

from facegrad.jobs import jobs_to_requeue, mark_enqueued
from facegrad.settings import Settings
from worker.queue import BrokerUnavailable, broker_holds, publish_job

log = logging.getLogger("facegrad.reconciler")


def reconcile_once(settings: Settings, grace_seconds: float = 15.0) -> list[str]:
    """One pass; returns the ids re-published."""
    dead, waiting = jobs_to_requeue(settings, grace_seconds)
    if not dead and not waiting:
        return []
    held = broker_holds(waiting) if waiting else set()
    sent = []
    for job_id in dead + [j for j in waiting if j not in held]:
        try:
            publish_job(job_id)
        except BrokerUnavailable:
            log.warning("broker down; job %s stays queued in the database until it is back", job_id)
            break
        mark_enqueued(settings, job_id)
        sent.append(job_id)
        log.info("re-queued job %s", job_id)
    return sent


class Reconciler(threading.Thread):
    def __init__(self, settings: Settings):
        super().__init__(daemon=True, name="reconciler")
        self.settings = settings
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.settings.reconcile_interval_seconds):
            try:
                reconcile_once(self.settings, grace_seconds=max(
                    5.0, 1.5 * self.settings.reconcile_interval_seconds))
            except Exception:
                log.exception("reconcile pass failed")

    def stop(self) -> None:
        self._stop.set()
