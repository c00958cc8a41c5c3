"""API keys: X-API-Key checked against sha256 hashes from FACEGRAD_API_KEYS, by role.

Two layers: :class:`APIKeyGate` answers 401 to a /v1 request without a valid key before its body
is read (an anonymous client cannot make the server parse a large upload), and the ``require``
dependencies check the key's role on each route (403 when the role may not do it).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import string

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader
from starlette.types import ASGIApp, Receive, Scope, Send

ROLES = ("admin", "identify")
HEADER = "X-API-Key"
PROTECTED_PREFIX = "/v1"
_HEX = frozenset(string.hexdigits)
_header = APIKeyHeader(name=HEADER, auto_error=False,
                       description="Required for every /v1 call when FACEGRAD_API_KEYS is set.")
UNAUTHORIZED = "missing or invalid API key: send it in the X-API-Key header"
_HOW = ("FACEGRAD_API_KEYS must be comma-separated 'role:<sha256 hex of the key>' entries, roles "
        "admin or identify, e.g. admin:$(printf %s \"$KEY\" | sha256sum | cut -d' ' -f1)")


def parse_keys(spec: str) -> list[tuple[str, bytes]]:
    """'role:sha256hex,role:sha256hex' → [(role, digest bytes)]; raises ValueError if malformed.

    The message names the entry by its position (never its text, which may be a pasted key) and
    says what to fix.
    """
    keys = []
    for n, item in enumerate(filter(None, (x.strip() for x in spec.split(","))), start=1):
        role, sep, hexdigest = item.partition(":")
        role, hexdigest = role.strip(), hexdigest.strip()
        if not sep:
            raise ValueError(f"FACEGRAD_API_KEYS entry {n} has no ':' between role and hash. "
                             + _HOW)
        if role not in ROLES:  # not echoed: a misplaced key must not end up in a log
            raise ValueError(f"FACEGRAD_API_KEYS entry {n} has an unknown role; it must be "
                             f"'admin' or 'identify'. {_HOW}")
        if len(hexdigest) != 64 or not set(hexdigest) <= _HEX:
            raise ValueError(f"FACEGRAD_API_KEYS entry {n} ({role}) is not a sha256 hex digest "
                             f"(64 hex characters; got {len(hexdigest)} characters). Put the "
                             f"key's hash there, not the key itself. {_HOW}")
        keys.append((role, bytes.fromhex(hexdigest)))
    return keys


def role_of(key: str | None, keys: list[tuple[str, bytes]]) -> str | None:
    """The role of ``key``, or None. Every entry is compared, each in constant time."""
    if key is None:
        return None
    digest = hashlib.sha256(key.encode()).digest()
    found = None
    for role, want in keys:  # no early exit
        if hmac.compare_digest(digest, want):
            found = found or role
    return found


class APIKeyGate:
    """401 for a /v1 request without a valid X-API-Key, before the request body is read.

    Only installed when keys are configured. The role is checked later by ``require``.
    """

    def __init__(self, app: ASGIApp, keys: list[tuple[str, bytes]]):
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and (path == PROTECTED_PREFIX
                                        or path.startswith(PROTECTED_PREFIX + "/")):
            raw = dict(scope["headers"]).get(HEADER.lower().encode())
            key = raw.decode("latin-1") if raw is not None else None
            if role_of(key, self.keys) is None:
                body = json.dumps({"detail": UNAUTHORIZED}).encode()
                await send({"type": "http.response.start", "status": 401,
                            "headers": [(b"content-type", b"application/json"),
                                        (b"content-length", str(len(body)).encode()),
                                        (b"www-authenticate", b"APIKey")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def require(*allowed: str):
    """Dependency: the caller's key must have one of ``allowed`` roles (admin has all)."""

    # async: a hash and a compare, not worth the thread-pool hop FastAPI gives a plain def
    async def check(request: Request, key: str | None = Depends(_header)) -> str | None:
        keys = request.app.state.api_keys
        if not keys:
            return None
        role = role_of(key, keys)
        if role is None:
            raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "APIKey"})
        if role != "admin" and role not in allowed:
            raise HTTPException(403, f"this API key's role '{role}' may not do this; "
                                f"it needs one of: admin, {', '.join(allowed)}"
                                if allowed else f"this API key's role '{role}' may not do this; "
                                "it needs an admin key")
        return role

    return check


admin_only = require()
identify_or_admin = require("identify")
