"""Publishing jobs to the broker, checking it, and asking whether it still holds a job."""

from __future__ import annotations

import uuid

from facegrad.service.settings import get_settings
from worker.celery_app import QUEUE, TASK_RUN_JOB, celery_app


class BrokerUnavailable(RuntimeError):
    pass


def publish_job(job_id: str) -> None:
    """Send a run_job message; raises BrokerUnavailable at once (no retry loop) if it can't."""
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
            celery_app.send_task(TASK_RUN_JOB, args=[job_id],
                                 task_id=f"{job_id}.{uuid.uuid4().hex[:8]}",
                                 queue=QUEUE, retry=False, connection=conn)
    except Exception as e:  # kombu/redis raise many types for a broker that is down
        raise BrokerUnavailable(f"the job broker does not answer ({type(e).__name__})") from e


def declare_queue() -> None:
    """Create the job queue on the broker, once, before several processes start using it: the
    embedded SQLite transport adds the queue's row on first use, and two workers started
    together both inserted it (a UNIQUE constraint failure stopped one of them)."""
    from kombu import Exchange, Queue

    with celery_app.connection_for_write() as conn:
        Queue(QUEUE, Exchange(QUEUE), routing_key=QUEUE)(conn.default_channel).declare()


def broker_ok() -> tuple[bool, str]:
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=2)
        return True, "ok"
    except Exception as e:
        return False, f"broker unreachable: {type(e).__name__}"


def broker_holds(job_ids: list[str]) -> set[str]:
    """The ids among ``job_ids`` that the broker still holds a message for.

    Redis: scan the queue list and the unacked hash. The embedded SQLite broker keeps its
    messages on disk across restarts, so every id is assumed held there.
    """
    settings = get_settings()
    if settings.embedded_broker or not settings.broker_url.startswith(("redis://", "rediss://")):
        return set(job_ids)
    import redis

    r = redis.Redis.from_url(settings.broker_url, socket_timeout=3, socket_connect_timeout=3)
    blobs = r.lrange(QUEUE, 0, -1) + list(r.hvals("unacked"))
    text = b"\n".join(blobs)
    return {j for j in job_ids if j.encode() in text}
