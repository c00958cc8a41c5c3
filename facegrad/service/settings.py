"""Service settings, from FACEGRAD_* environment variables (shared by the API, worker and CLI)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACEGRAD_", extra="ignore")

    data_dir: Path = Field(Path("./var"), description="All files: datasets, runs, SQLite files.")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL; unset = SQLite file in data_dir/facegrad.service.db."
    )
    broker_url: str | None = Field(
        None, description="Celery broker, e.g. redis://127.0.0.1:6379/0; unset = embedded SQLite."
    )
    api_keys: str = Field(
        "", description="Comma-separated role:sha256hex entries (roles: admin, identify)."
    )
    cors_origins: str = Field("", description="Comma-separated origins allowed by CORS.")
    host: str = "127.0.0.1"
    port: int = 8000

    max_upload_bytes: int = 512 * 1024 * 1024
    max_archive_members: int = 50_000
    max_uncompressed_bytes: int = 2 * 1024**3
    max_member_bytes: int = 64 * 1024**2
    max_compression_ratio: float = 200.0
    max_image_pixels: int = 40_000_000
    max_identify_files: int = 32
    max_identify_bytes: int = 64 * 1024**2

    upload_wait_seconds: float = Field(
        10.0, ge=0, le=300,
        description="How long POST /v1/datasets waits for the ingest it started (decoding, "
        "detection, alignment) before it answers 202 with the dataset still ingesting; an "
        "ingest done by then answers 201 with the ready dataset (or the 4xx of a refused one). "
        "A client's 'Prefer: respond-async' (or a shorter 'Prefer: wait=N') asks for less.")
    ingest_lease_seconds: int = Field(
        30, ge=2, le=3600,
        description="An ingest whose API process has not renewed its lease for this long is "
        "taken over by another API process (or the same one restarted) and run again.")

    max_sweep_jobs: int = Field(
        64, ge=1, le=10_000,
        description="Most jobs one sweep may queue (the product of its grid's list lengths); a "
        "larger grid is refused with 422 and nothing is queued.")

    job_lease_seconds: int = Field(
        120, description="A running job whose worker has not renewed its lease for this long is "
        "considered dead and may be taken over by another worker."
    )
    job_max_attempts: int = Field(
        3, ge=1, le=100, description="Attempts a job gets when one of its training processes "
        "dies (a rank of a multi-device job); each resumes from the last checkpoint."
    )
    reconcile_interval_seconds: float = 10.0
    identify_batch_wait_ms: float = 2.0
    identify_max_batch: int = Field(
        16, ge=1, le=1024,
        description="Most faces one identify forward pass describes. On a CPU a face costs no "
        "less in a batch of 32 than in one of 16, while every request queued behind a batch "
        "waits for all of it: smaller batches keep the slowest requests close to the typical. "
        "Raise it on a GPU.")
    log_json: bool = False
    worker_metrics_port: int | None = Field(
        None, description="Port on which each training worker serves its Prometheus metrics "
        "(listening on FACEGRAD_HOST); unset = not served."
    )

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        return _sqlite_url(self.data_dir / "facegrad.service.db")

    @property
    def celery_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def embedded_broker(self) -> bool:
        return not self.broker_url


@lru_cache(maxsize=64)
def _sqlite_url(path: Path) -> str:
    # resolved once per path: a realpath() per identify call was a sixth of its decode thread
    return f"sqlite:///{path.resolve()}"


@lru_cache
def get_settings() -> Settings:
    s = Settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    return s
