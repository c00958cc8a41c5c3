"""The job lease that keeps a redelivered job from running twice, on SQLite and PostgreSQL."""

from __future__ import annotations

import time
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, text

from facegrad.service.db import Dataset, Job, get_engine, session_scope, utcnow
from facegrad.service.jobs import Heartbeat, acquire_lease, jobs_to_requeue
from facegrad.service.settings import Settings

PG_ADMIN = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


def _postgres_url() -> str | None:
    """A fresh database on the machine's PostgreSQL, or None when there is none."""
    try:
        eng = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT",
                            connect_args={"connect_timeout": 2})
        name = f"facegrad_test_{uuid.uuid4().hex[:8]}"
        with eng.connect() as c:
            c.execute(text(f"CREATE DATABASE {name}"))
        eng.dispose()
        return f"postgresql+psycopg2://postgres@127.0.0.1:5432/{name}"
    except Exception:
        return None


@pytest.fixture(params=["sqlite", "postgresql"])
def settings(request, tmp_path):
    if request.param == "sqlite":
        yield Settings(data_dir=tmp_path, job_lease_seconds=2)
        return
    url = _postgres_url()
    if url is None:
        pytest.skip("no PostgreSQL answers on 127.0.0.1:5432")
    yield Settings(data_dir=tmp_path, database_url=url, job_lease_seconds=2)
    get_engine(url).dispose()
    eng = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with eng.connect() as c:
        c.execute(text(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)"))
    eng.dispose()


def make_job(settings) -> str:
    with session_scope(settings.db_url) as s:
        ds = Dataset(name="d", num_images=1, num_identities=1, source_format="zip")
        s.add(ds)
        s.flush()
        job = Job(dataset_id=ds.id, config={})
        s.add(job)
        s.flush()
        return job.id


def test_lease_is_exclusive_until_it_expires(settings):
    job_id = make_job(settings)
    assert acquire_lease(settings, job_id, "w1")
    assert not acquire_lease(settings, job_id, "w2")  # a redelivery while w1 is alive
    with session_scope(settings.db_url) as s:
        s.get(Job, job_id).lease_expires = utcnow() - timedelta(seconds=1)
    assert acquire_lease(settings, job_id, "w2")  # w1 died: its lease ran out
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        assert job.attempts == 2 and job.lease_owner == "w2" and job.status == "running"


def test_finished_or_cancelled_jobs_are_never_taken(settings):
    for status in ("succeeded", "failed", "cancelled"):
        job_id = make_job(settings)
        with session_scope(settings.db_url) as s:
            s.get(Job, job_id).status = status
        assert not acquire_lease(settings, job_id, "w")
    job_id = make_job(settings)
    with session_scope(settings.db_url) as s:
        s.get(Job, job_id).cancel_requested = True
    assert not acquire_lease(settings, job_id, "w")


def test_heartbeat_renews_and_sees_cancel(settings):
    job_id = make_job(settings)
    assert acquire_lease(settings, job_id, "w1")
    hb = Heartbeat(settings, job_id, "w1")
    hb.start()
    try:
        time.sleep(3)  # longer than the 2 s lease: only renewal keeps it
        assert not acquire_lease(settings, job_id, "w2")
        with session_scope(settings.db_url) as s:
            s.get(Job, job_id).cancel_requested = True
        end = time.time() + 5
        while not hb.cancelled.is_set() and time.time() < end:
            time.sleep(0.1)
        assert hb.cancelled.is_set()
    finally:
        hb.stop()


def test_requeue_candidates(settings):
    dead, waiting = make_job(settings), make_job(settings)
    fresh = make_job(settings)
    assert acquire_lease(settings, dead, "w1")
    with session_scope(settings.db_url) as s:
        s.get(Job, dead).lease_expires = utcnow() - timedelta(seconds=5)
        s.get(Job, waiting).enqueued_at = utcnow() - timedelta(seconds=60)
        s.get(Job, fresh).enqueued_at = utcnow()
    d, w = jobs_to_requeue(settings, grace_seconds=30)
    assert d == [dead] and w == [waiting]
