"""``facegrad identify``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from facegrad.service.client_cli.client import DEFAULT_URL, Client
from facegrad.service.client_cli.common import (
    IDENTIFY_CHUNK,
    Detect,
    JsonOpt,
    KeyOpt,
    UrlOpt,
    _f,
    _out,
    handled,
    print_json,
)

# --- identify and models -------------------------------------------------------------------

@handled
def identify(
    images: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False,
                                                 help="Image files.")],
    model: Annotated[str | None, typer.Option(help="Model id (default: the newest).")] = None,
    top_k: Annotated[int | None, typer.Option(help="Candidates per face (server default 5).")]
    = None,
    threshold: Annotated[float | None, typer.Option(
        help="Similarity under which a face is 'unknown' (default: the model's calibrated "
        "one).")] = None,
    detect: Annotated[Detect | None, typer.Option(
        help="Find faces ('auto') or take each image as one face ('none'); default: the "
        "model's.")] = None,
    url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False,
):
    """Who is in these photos? One row per face; 'unknown' under the threshold."""
    client = Client(url, api_key)
    form: dict[str, Any] = {}
    for key, val in (("model_id", model), ("top_k", top_k), ("threshold", threshold),
                     ("detect", detect.value if detect else None)):
        if val is not None:
            form[key] = str(val)
    doc: dict[str, Any] = {}
    for i in range(0, len(images), IDENTIFY_CHUNK):
        files = [("file", (p.name, p.read_bytes())) for p in images[i:i + IDENTIFY_CHUNK]]
        part = client.post("/v1/identify", files=files, data=form)
        if not doc:
            doc = part
            form["model_id"] = part["model_id"]  # the same model for every chunk
        else:
            doc["results"] += part["results"]
    if as_json:
        return print_json(doc)
    t = Table("file", "face", "box", "identity", "confidence", "candidates",
              title=f"model {doc['model_id']}, threshold {_f(doc['threshold'])}")
    for path, res in zip(images, doc["results"]):
        name = str(path)  # the path as given: two photos may share a file name
        if not res["faces"]:
            t.add_row(name, "-", "-", "[yellow]no face[/]", "-", res.get("note") or "")
        for n, face in enumerate(res["faces"], 1):
            who = face["identity"] if face["identity"] is not None else "[yellow]unknown[/]"
            cands = ", ".join(f"{c['identity']} {c['confidence']:.3f}" for c in face["candidates"])
            box = "whole image" if face["box"] is None else "x{} y{} {}x{}".format(*face["box"])
            t.add_row(name, str(n), box, who, f"{face['confidence']:.3f}", cands)
    _out().print(t)
