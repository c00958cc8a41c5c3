"""Where files live under the data folder. Every path is built from server-made ids only."""

from __future__ import annotations

import re
from pathlib import Path

from facegrad.service.settings import Settings

_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def _checked(id_: str) -> str:
    if not _ID.match(id_):
        raise ValueError(f"not a server-made id: {id_!r}")
    return id_


def dataset_dir(settings: Settings, dataset_id: str) -> Path:
    return settings.data_dir.resolve() / "datasets" / _checked(dataset_id)


def run_dir(settings: Settings, job_id: str) -> Path:
    return settings.data_dir.resolve() / "runs" / _checked(job_id)


def upload_tmp_dir(settings: Settings) -> Path:
    p = settings.data_dir.resolve() / "tmp"
    p.mkdir(parents=True, exist_ok=True)
    return p


def pretrained_dir(settings: Settings) -> Path:
    """Pretrained weights converted once from their package's files (safetensors + JSON)."""
    return settings.data_dir.resolve() / "pretrained"
