"""``facegrad models list``."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from facegrad.service.client_cli.client import DEFAULT_URL, Client
from facegrad.service.client_cli.common import (
    JsonOpt,
    KeyOpt,
    UrlOpt,
    _f,
    _out,
    _pct,
    _when,
    clip_text,
    handled,
    print_json,
)

models_app = typer.Typer(help="Trained models.", no_args_is_help=True)


@models_app.command("list")
@handled
def models_list(limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
                url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False):
    """List trained models, newest first."""
    doc = Client(url, api_key).get("/v1/models", params={"limit": limit})
    if as_json:
        return print_json(doc)
    t = Table("id", "arch", "identities", "input", "val acc", "threshold", "clip", "created",
              "job", title=f"{doc['total']} models")
    for m in doc["items"]:
        t.add_row(m["id"], m["architecture"], str(len(m["labels"])),
                  "x".join(map(str, m["input_size"][:2])),
                  _pct((m.get("metrics") or {}).get("val_acc")), _f(m["threshold"], 3),
                  clip_text(m.get("clip")), _when(m["created_at"]), (m.get("job_id") or "-")[:8])
    _out().print(t)
