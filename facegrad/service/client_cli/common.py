"""What the client commands share: the options every command takes, value choices,
consoles, the error handler and small formatters."""

from __future__ import annotations

import functools
import json
import sys
from enum import Enum
from typing import Annotated, Any

import typer
from rich.console import Console

from facegrad.service.client_cli.client import ClientError

TERMINAL = ("succeeded", "failed", "cancelled")
SWEEP_FINAL = ("succeeded", "failed", "partial", "cancelled")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".pgm", ".ppm", ".pbm", ".bmp", ".webp", ".gif",
                  ".tif", ".tiff"}
IDENTIFY_CHUNK = 16  # files per identify call (the server's default cap is 32)
PANEL = "Client (talks to a running server)"

UrlOpt = Annotated[str, typer.Option(
    "--url", envvar="FACEGRAD_URL", help="Server URL.", show_default=True)]
KeyOpt = Annotated[str | None, typer.Option(
    "--api-key", envvar="FACEGRAD_API_KEY", show_default=False,
    help="API key, sent as X-API-Key (needed when the server has FACEGRAD_API_KEYS).")]
JsonOpt = Annotated[bool, typer.Option(
    "--json", help="Print the server's JSON instead of tables.")]


class Detect(str, Enum):
    auto = "auto"
    none = "none"


class Optim(str, Enum):
    sgd = "sgd"
    adam = "adam"
    adamw = "adamw"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Status(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"

def _out() -> Console:
    # Not a terminal (a pipe, a test): wide enough that ids are never cut.
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


def _err() -> Console:
    return Console(stderr=True, width=None if sys.stderr.isatty() else 200, highlight=False)


def handled(fn):
    """Turn ClientError (and a lost connection) into 'facegrad: error: ...' + exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ClientError as e:
            _err().print(f"facegrad: error: {e}", markup=False)
            raise typer.Exit(1) from None

    return wrapper

def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")
    sys.stdout.flush()


def _f(x, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _when(ts: str | None) -> str:
    return (ts or "-").replace("T", " ")[:19]


def clip_text(clip: dict | None) -> str:
    if not clip:
        return "-"
    extra = [f"{k}={v}" for k, v in clip.items() if k not in ("mode", "on_nonfinite")]
    return clip.get("mode", "?") + (f" ({', '.join(extra)})" if extra else "")
