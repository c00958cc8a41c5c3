"""API keys: X-API-Key checked against sha256 hashes from FACEGRAD_API_KEYS, by role."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader

from app.deps import get_settings_dep
from facegrad.settings import Settings

ROLES = ("admin", "identify")
_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                       description="Required for every /v1 call when FACEGRAD_API_KEYS is set.")


def parse_keys(spec: str) -> list[tuple[str, bytes]]:
    """'role:sha256hex,role:sha256hex' → [(role, digest bytes)]; raises ValueError if malformed."""
    keys = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        role, _, hexdigest = item.partition(":")
        if role not in ROLES or len(hexdigest) != 64:
            raise ValueError(f"FACEGRAD_API_KEYS entry {item[:20]!r}... must be "
                             "'admin:<sha256 hex>' or 'identify:<sha256 hex>'")
        keys.append((role, bytes.fromhex(hexdigest)))
    return keys


def role_of(key: str | None, keys: list[tuple[str, bytes]]) -> str | None:
    if key is None:
        return None
    digest = hashlib.sha256(key.encode()).digest()
    found = None
    for role, want in keys:  # no early exit: every entry is compared, in constant time
        if hmac.compare_digest(digest, want):
            found = found or role
    return found


def require(*allowed: str):
    """Dependency: the caller's key must have one of ``allowed`` roles (admin has all)."""

    def check(request: Request, key: str | None = Depends(_header),
              settings: Settings = Depends(get_settings_dep)) -> str | None:
        keys = request.app.state.api_keys
        if not keys:
            return None
        role = role_of(key, keys)
        if role is None:
            raise HTTPException(401, "missing or invalid API key: send it in the X-API-Key header",
                                headers={"WWW-Authenticate": "APIKey"})
        if role != "admin" and role not in allowed:
            raise HTTPException(403, f"this API key's role '{role}' may not do this; "
                                f"it needs one of: admin, {', '.join(allowed)}"
                                if allowed else f"role '{role}' may not do this; it needs admin")
        return role

    return check


admin_only = require()
identify_or_admin = require("identify")
