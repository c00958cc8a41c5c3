"""The OpenAPI document as client generators read it.

- operation ids are the route functions' names (``upload_dataset``, ``get_job``, ...);
- every /v1 operation documents 401, 403 and 422 with the one :class:`~app.schemas.Error` shape
  (FastAPI's ``HTTPValidationError`` is never added: each operation already has a 422);
- file fields say ``format: binary`` beside FastAPI's ``contentMediaType``, which generators
  (openapi-python-client among them) otherwise type as a string and send as text;
- the value sets of :data:`~app.schemas.SHARED_ENUMS` are one component each, referenced by
  every field that has them, instead of a copy inline in each.
"""

from __future__ import annotations

from typing import Any, get_args

from fastapi import FastAPI
from fastapi.routing import APIRoute

from app.schemas import SHARED_ENUMS, Error

REF = "#/components/schemas/"
DATA = ("default", "example", "examples", "const")  # values, not schemas: left as they are
V1_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Error, "description": "No valid X-API-Key (a server with FACEGRAD_API_KEYS)"},
    403: {"model": Error, "description": "The API key's role may not do this"},
    422: {"model": Error, "description": "Invalid input: `detail` says what to fix; for "
          "invalid parameters or body fields it lists them ({loc, msg, type} each)"},
}


def operation_id(route: APIRoute) -> str:
    """The route function's name: short and stable."""
    return route.name


def install(app: FastAPI) -> None:
    """Wrap ``app.openapi`` so that the document it builds (once) is :func:`finish`-ed."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            finish(build())
        return app.openapi_schema

    app.openapi = openapi


def finish(doc: dict[str, Any]) -> dict[str, Any]:
    """File fields typed binary and the shared enums named, in place; returns ``doc``."""
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    enums = {name: list(get_args(t)) for name, t in SHARED_ENUMS.items()}
    doc["paths"] = _fix(doc["paths"], enums)
    for name, schema in list(schemas.items()):
        schemas[name] = _fix(schema, enums)
    for name, values in enums.items():
        schemas[name] = {"type": "string", "enum": values, "title": name}
    doc["components"]["schemas"] = dict(sorted(schemas.items()))
    return doc


def _fix(node: Any, enums: dict[str, list]) -> Any:
    if isinstance(node, list):
        return [_fix(v, enums) for v in node]
    if not isinstance(node, dict):
        return node
    node = {k: v if k in DATA else _fix(v, enums) for k, v in node.items()}
    if node.get("type") == "string" and node.get("contentMediaType") == "application/octet-stream":
        node.setdefault("format", "binary")
    if "enum" in node:
        for name, values in enums.items():
            if node["enum"] == values:
                rest = {k: v for k, v in node.items() if k not in ("type", "enum", "title")}
                return {"$ref": REF + name, **rest}
    return node
