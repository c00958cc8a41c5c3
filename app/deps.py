"""Request dependencies: settings and a database session."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi import Request
from sqlalchemy.orm import Session

from facegrad.service.db import session_scope
from facegrad.service.settings import Settings


async def get_settings_dep(request: Request) -> Settings:
    # async: FastAPI runs a plain ``def`` dependency in its thread pool, a thread hop per call
    return request.app.state.settings


def get_db(request: Request) -> Iterator[Session]:
    """A session per request: committed after the handler, rolled back if it raised."""
    with session_scope(request.app.state.settings.db_url) as s:
        yield s
