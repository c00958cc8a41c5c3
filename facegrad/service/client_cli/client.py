"""The HTTP client of the ``facegrad`` client commands: one server, its API key, its errors."""

from __future__ import annotations

import json
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"

class ClientError(Exception):
    """A failure to report on stderr with exit status 1."""

def detail_of(r: httpx.Response) -> str:
    """The server's ``detail`` as one readable line (422 lists become 'field: message; ...')."""
    try:
        detail = r.json().get("detail", r.text)
    except (ValueError, AttributeError):
        return r.text.strip()[:500] or r.reason_phrase
    if isinstance(detail, list):
        parts = []
        for e in detail:
            if isinstance(e, dict):
                loc = [str(x) for x in e.get("loc", []) if x not in ("body", "query", "path")]
                parts.append(f"{'.'.join(loc)}: {e.get('msg', '')}" if loc else e.get("msg", ""))
            else:
                parts.append(str(e))
        return "; ".join(parts)
    return detail if isinstance(detail, str) else json.dumps(detail)


class Client:
    def __init__(self, url: str, api_key: str | None, timeout: float = 300):
        self.url = url.rstrip("/")
        headers = {"X-API-Key": api_key} if api_key else {}
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def request(self, method: str, path: str, raw: bool = False, **kw) -> Any:
        """The answer's JSON (``raw``: its text); ClientError for an error or no answer."""
        try:
            r = self.http.request(method, path, **kw)
        except httpx.HTTPError as e:
            raise ClientError(f"cannot reach the facegrad server at {self.url} "
                              f"({type(e).__name__}: {e}); start it with 'facegrad up' or "
                              "set --url / FACEGRAD_URL") from None
        if r.status_code >= 400:
            raise ClientError(f"{detail_of(r)} (HTTP {r.status_code})")
        if raw:
            return r.text
        if not r.content:
            return None
        try:
            return r.json()
        except ValueError:
            raise ClientError(f"{self.url}{path} did not answer JSON; is --url a facegrad "
                              "server?") from None

    def get(self, path: str, **kw) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw) -> Any:
        return self.request("POST", path, **kw)
