"""Bounded uploads: a request-size limit for the whole body and spooling of one file."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from fastapi import HTTPException, UploadFile
from fastapi import Path as PathParam
from starlette.types import ASGIApp, Receive, Scope, Send

from facegrad.service.settings import Settings
from facegrad.service.storage import upload_tmp_dir

UUID_PATTERN = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"


def uuid_path(kind: str):
    return PathParam(pattern=UUID_PATTERN, description=f"the {kind}'s id (a UUID)")


class BodyLimit:
    """413 for a request body over ``max_bytes`` + ``slack``: by Content-Length up front, else
    while it is read (a chunked upload is cut off as soon as it passes the limit).

    ``max_bytes`` is FACEGRAD_MAX_UPLOAD_BYTES, the limit for the uploaded file; ``slack`` leaves
    room for the multipart framing and the other form fields. Messages name the setting and its
    configured value, not the internal total.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, slack: int = 0):
        self.app, self.max_bytes, self.limit = app, max_bytes, max_bytes + slack

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await _too_large(send, self.max_bytes)
        seen = 0
        started = False

        async def counted_receive():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.max_bytes)
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counted_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _too_large(send, self.max_bytes)


def _too_large_detail(max_bytes: int) -> str:
    return (f"request body is over the limit: the uploaded file may be at most {max_bytes} bytes "
            "(setting FACEGRAD_MAX_UPLOAD_BYTES); upload a smaller file or split the dataset")


class BodyTooLarge(HTTPException):
    """Raised from ``receive`` when a body without (or with a false) Content-Length runs over.

    An HTTPException, so that FastAPI's body parsing re-raises it as the 413 it is rather than
    turning it into "400 There was an error parsing the body".
    """

    def __init__(self, max_bytes: int):
        super().__init__(413, _too_large_detail(max_bytes))


async def _too_large(send: Send, max_bytes: int) -> None:
    body = json.dumps({"detail": _too_large_detail(max_bytes)}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def spool_upload(file: UploadFile, settings: Settings, max_bytes: int) -> Path:
    """Copy an uploaded file to a private temp file under the data folder, bounded in size.

    Nothing is left behind when it fails: the temp file is removed on every error.
    """
    tmp = upload_tmp_dir(settings) / f"upload-{uuid.uuid4().hex}"
    written = 0
    try:
        with open(tmp, "wb") as out:
            while chunk := file.file.read(1 << 20):
                written += len(chunk)
                if written > max_bytes:
                    raise HTTPException(413, f"the uploaded file is over the limit of {max_bytes} "
                                        "bytes (setting FACEGRAD_MAX_UPLOAD_BYTES); upload a "
                                        "smaller file or split the dataset")
                out.write(chunk)
        if written == 0:
            raise HTTPException(422, "the uploaded file is empty (0 bytes); send the .zip or .npz "
                                "file itself in the 'file' field")
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def read_bounded(file: UploadFile, max_bytes: int, what: str) -> bytes:
    data = file.file.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise HTTPException(413, f"{what} is over the limit of {max_bytes} bytes "
                            "(setting FACEGRAD_MAX_IDENTIFY_BYTES); send a smaller image")
    return data


