"""The web console: static HTML/JS/CSS at ``/`` and plotly.js from the installed ``plotly`` wheel.

Nothing third-party is kept in this repository: ``/static/vendor/plotly.min.js`` is read from the
``plotly`` package's ``package_data`` (a dependency in pyproject.toml), so the console works
offline. The pages hold no data; every API call they make sends the X-API-Key the user typed.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, FastAPI, HTTPException
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
router = APIRouter(include_in_schema=False)


@lru_cache(maxsize=1)
def plotly_js() -> Path | None:
    """plotly.min.js inside the installed plotly package (found without importing it)."""
    spec = importlib.util.find_spec("plotly")
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = Path(base) / "package_data" / "plotly.min.js"
        if path.is_file():
            return path
    return None


@router.get("/")
def index():
    return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/static/vendor/plotly.min.js")
def plotly():
    path = plotly_js()
    if path is None:
        raise HTTPException(404, "plotly.min.js not found: install the 'plotly' package "
                            "(pip install plotly) for the console's charts")
    return FileResponse(path, media_type="text/javascript",
                        headers={"Cache-Control": "public, max-age=86400"})


def install(app: FastAPI) -> None:
    """The console's routes; the vendor route comes before the /static mount that would hide it."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
