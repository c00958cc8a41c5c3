"""State of the service in SQL (SQLite by default, PostgreSQL by URL): datasets, jobs, sweeps,
models.

The worker writes progress here and the API reads it; nothing lives only in the broker or in a
process's memory.
"""

from __future__ import annotations

import sqlite3
import time
import uuid
from contextlib import contextmanager
from datetime import datetime, timezone
from functools import lru_cache

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.schema import CreateColumn


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_id() -> str:
    return str(uuid.uuid4())


class Base(DeclarativeBase):
    type_annotation_map = {datetime: DateTime(timezone=True), dict: JSON, list: JSON}


class Dataset(Base):
    """An uploaded dataset. ``status`` is ``ingesting`` while its images are decoded, cropped and
    stored (facegrad/service/ingest.py), then ``ready`` or ``failed`` (``error`` says why).
    An ingest is held by one API process through a lease (``ingest_owner``, ``ingest_expires``)
    that it renews; an expired one is taken over and run again from the saved upload."""

    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    num_images: Mapped[int] = mapped_column(Integer)
    num_identities: Mapped[int] = mapped_column(Integer)
    identities: Mapped[dict] = mapped_column(default=dict)
    rejected: Mapped[dict] = mapped_column(default=dict)
    detect: Mapped[str] = mapped_column(String(10), default="none")
    source_format: Mapped[str] = mapped_column(String(10))
    info: Mapped[dict] = mapped_column(default=dict)
    # Columns added after the first release: each has a server default or is nullable, so that
    # add_missing_columns can add it to an existing table (rows there were stored ready).
    status: Mapped[str] = mapped_column(String(12), default="ready", server_default="ready")
    progress: Mapped[dict | None] = mapped_column(nullable=True, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    ingest_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    ingest_expires: Mapped[datetime | None] = mapped_column(nullable=True)
    ingest_attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    dataset_id: Mapped[str] = mapped_column(String(36), index=True)
    status: Mapped[str] = mapped_column(String(12), index=True, default="queued")
    config: Mapped[dict] = mapped_column()
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    progress: Mapped[dict] = mapped_column(default=dict)
    metrics: Mapped[dict] = mapped_column(default=dict)
    clipping: Mapped[dict] = mapped_column(default=dict)
    checkpoints: Mapped[list] = mapped_column(default=list)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    model_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    resumed_from_epoch: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_owner: Mapped[str | None] = mapped_column(String(200), nullable=True)
    lease_expires: Mapped[datetime | None] = mapped_column(nullable=True)
    worker: Mapped[str | None] = mapped_column(String(200), nullable=True)
    device: Mapped[str | None] = mapped_column(String(20), nullable=True)
    info: Mapped[dict] = mapped_column(default=dict)


class JobEpoch(Base):
    __tablename__ = "job_epochs"
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), primary_key=True)
    epoch: Mapped[int] = mapped_column(Integer, primary_key=True)
    record: Mapped[dict] = mapped_column()


class Sweep(Base):
    """A grid of job settings queued at once; its status and progress are read off its jobs."""

    __tablename__ = "sweeps"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    dataset_id: Mapped[str] = mapped_column(String(36), index=True)
    base: Mapped[dict] = mapped_column()
    grid: Mapped[dict] = mapped_column()
    metric: Mapped[str] = mapped_column(String(40), default="val_acc")
    job_ids: Mapped[list] = mapped_column(default=list)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)


class Model(Base):
    __tablename__ = "models"
    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    job_id: Mapped[str | None] = mapped_column(ForeignKey("jobs.id"), nullable=True)
    dataset_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    architecture: Mapped[str] = mapped_column(String(40))
    path: Mapped[str] = mapped_column(Text)
    labels: Mapped[list] = mapped_column()
    metrics: Mapped[dict] = mapped_column(default=dict)
    config: Mapped[dict] = mapped_column(default=dict)
    preprocessing: Mapped[dict] = mapped_column(default=dict)
    open_set: Mapped[dict] = mapped_column(default=dict)
    detect: Mapped[str] = mapped_column(String(10), default="none")
    gallery_version: Mapped[int] = mapped_column(Integer, default=0)
    threshold: Mapped[float] = mapped_column(Float, default=0.5)


@lru_cache(maxsize=8)
def get_engine(url: str):
    kwargs = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _pragmas(conn, _):
            cur = conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            _switch_to_wal(cur)
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()
    create_schema(engine)
    return engine


def _switch_to_wal(cur, wait_s: float = 30.0) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process holds the database.

    Switching a new database to WAL upgrades a read lock to a write lock, and SQLite answers
    that upgrade "database is locked" at once, without its busy handler, when another
    connection is doing the same (it would deadlock otherwise). Processes that open a fresh
    database together (``facegrad up``, a compose deployment) hit this: 6 of 40 rounds of eight
    processes on this machine. The switch is persistent, so whoever comes second finds WAL set.
    """
    deadline = time.monotonic() + wait_s
    delay = 0.01
    while True:
        try:
            cur.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.5)


# pg_advisory_xact_lock key (any 64-bit number that no other code uses): "facegrad" in ASCII
SCHEMA_LOCK_KEY = 0x6661636567726164


def create_schema(engine) -> None:
    """Create the missing tables, one process at a time.

    Every API and worker process calls this when it starts, and ``facegrad up`` or a compose
    deployment starts several at once. Two processes that create the same table together can
    both pass the existence check; the second then fails: on PostgreSQL with a unique violation
    on the catalog (``pg_type_typname_nsp_index``), on SQLite with "table ... already exists"
    (each seen in 3 of 5 rounds of four processes started together on an empty database). The
    check and the creation run in one transaction that holds a lock until it commits: a
    transaction-scoped advisory lock on PostgreSQL, the database's write lock (BEGIN IMMEDIATE)
    on SQLite. The processes that waited then find the tables and create nothing.

    Tables made by an earlier version get the columns added since (:func:`add_missing_columns`)
    in the same transaction.
    """
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEMA_LOCK_KEY})
        elif conn.dialect.name == "sqlite":
            # the sqlite3 module opens no transaction before DDL by itself
            conn.exec_driver_sql("BEGIN IMMEDIATE")
        Base.metadata.create_all(conn)
        add_missing_columns(conn)


def add_missing_columns(conn) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for each model column that its existing table lacks.

    ``create_all`` creates missing tables only. A column added to a model later must be nullable
    or have a ``server_default`` (SQLite and PostgreSQL then fill the existing rows with it).
    """
    inspector = inspect(conn)
    existing_tables = set(inspector.get_table_names())
    for table in Base.metadata.sorted_tables:
        if table.name not in existing_tables:
            continue
        have = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            if not column.nullable and column.server_default is None:
                raise RuntimeError(f"column {table.name}.{column.name} cannot be added to an "
                                   "existing table: give it a server_default or make it nullable")
            spec = CreateColumn(column).compile(dialect=conn.dialect)
            name = conn.dialect.identifier_preparer.quote(table.name)
            conn.exec_driver_sql(f"ALTER TABLE {name} ADD COLUMN {spec}")


@lru_cache(maxsize=8)
def _sessionmaker(url: str):
    return sessionmaker(get_engine(url), expire_on_commit=False)


@contextmanager
def session_scope(url: str):
    """A session that commits on success and rolls back on error."""
    s = _sessionmaker(url)()
    try:
        yield s
        s.commit()
    except BaseException:
        s.rollback()
        raise
    finally:
        s.close()
