"""Bounded uploads: a request-size limit for the whole body and spooling of one file."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from fastapi import HTTPException, UploadFile
from fastapi import Path as PathParam
from starlette.types import ASGIApp, Receive, Scope, Send

from facegrad.settings import Settings
from facegrad.storage import upload_tmp_dir

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


def uuid_path(kind: str):
    return PathParam(pattern=UUID_PATTERN, description=f"the {kind}'s id (a UUID)")


class BodyLimit:
    """413 for a request body over ``max_bytes``: by Content-Length up front, else while read."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await _too_large(send, self.max_bytes)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _too_large(send, self.max_bytes)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send: Send, max_bytes: int) -> None:
    body = (f'{{"detail":"request body is over the limit of {max_bytes} bytes '
            f'(FACEGRAD_MAX_UPLOAD_BYTES)"}}').encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def spool_upload(file: UploadFile, settings: Settings, max_bytes: int) -> Path:
    """Copy an uploaded file to a private temp file under the data folder, bounded in size."""
    tmp = upload_tmp_dir(settings) / f"upload-{uuid.uuid4().hex}"
    written = 0
    with open(tmp, "wb") as out:
        while chunk := file.file.read(1 << 20):
            written += len(chunk)
            if written > max_bytes:
                out.close()
                os.unlink(tmp)
                raise HTTPException(413, f"upload is over the limit of {max_bytes} bytes "
                                    "(FACEGRAD_MAX_UPLOAD_BYTES)")
            out.write(chunk)
    if written == 0:
        tmp.unlink()
        raise HTTPException(422, "the uploaded file is empty")
    return tmp


def read_bounded(file: UploadFile, max_bytes: int, what: str) -> bytes:
    data = file.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, f"{what} is over the limit of {max_bytes} bytes "
                            "(FACEGRAD_MAX_IDENTIFY_BYTES)")
    return data


