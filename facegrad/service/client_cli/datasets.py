"""``facegrad dataset upload|list|show``."""

from __future__ import annotations

import io
import time
import zipfile
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from facegrad.service.client_cli.client import DEFAULT_URL, Client, ClientError
from facegrad.service.client_cli.common import (
    IMAGE_SUFFIXES,
    Detect,
    JsonOpt,
    KeyOpt,
    UrlOpt,
    _err,
    _out,
    _when,
    handled,
    print_json,
)

# --- datasets ---------------------------------------------------------------------------------

def zip_folder(folder: Path) -> tuple[bytes, int, int]:
    """Zip the images of ``folder``'s identity sub-folders in memory → (bytes, files, skipped).

    ``folder/alice/1.jpg`` becomes ``alice/1.jpg``; deeper nesting is kept (the server takes the
    innermost folder as the identity). Hidden files and non-images are left out.
    """
    buf = io.BytesIO()
    n = skipped = 0
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as z:
        for p in sorted(folder.rglob("*")):
            rel = p.relative_to(folder)
            if not p.is_file() or any(part.startswith(".") for part in rel.parts):
                continue
            if len(rel.parts) < 2 or p.suffix.lower() not in IMAGE_SUFFIXES:
                skipped += 1
                continue
            z.write(p, rel.as_posix())
            n += 1
    if n == 0:
        raise ClientError(f"{folder} has no images in identity sub-folders (expected "
                          f"{folder}/<identity>/<image>, e.g. {folder}/alice/1.jpg)")
    return buf.getvalue(), n, skipped


def _ingest_text(ds: dict) -> str:
    """'ready', 'ingesting 120/400', 'failed'."""
    status = ds.get("status", "ready")
    if status == "ingesting":
        p = ds.get("progress") or {}
        return f"ingesting {p.get('done', 0)}/{p.get('total', '?')}"
    return status


def show_dataset(ds: dict, console: Console) -> None:
    status = ds.get("status", "ready")
    if status != "ready":
        console.print(f"dataset [bold]{ds['id']}[/] {ds['name']!r}: {_ingest_text(ds)} files "
                      f"(detect={ds.get('detect')}, {ds.get('source_format')})")
        if status == "failed":
            console.print(Text.assemble(("failed: ", "red"), ds.get("error") or "no reason given"))
    else:
        console.print(f"dataset [bold]{ds['id']}[/] {ds['name']!r}: {ds['num_identities']} "
                      f"identities, {ds['num_images']} images (detect={ds.get('detect')}, "
                      f"{ds.get('source_format')})")
    if status == "ready":
        _identity_table(ds, console)
    _rejected_tables(ds, console)


def _identity_table(ds: dict, console: Console) -> None:
    t = Table("identity", "images")
    for label, count in sorted(ds.get("identities", {}).items()):
        t.add_row(label, str(count))
    console.print(t)


def _rejected_tables(ds: dict, console: Console) -> None:
    rejected = ds.get("rejected") or {}
    if rejected:
        r = Table("rejected file", "reason", title=f"{len(rejected)} rejected")
        for name, why in sorted(rejected.items()):
            r.add_row(name, why)
        console.print(r)
    for w in ds.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {w}")


def follow_ingest(client: Client, ds: dict, poll: float, quiet: bool) -> dict:
    """Poll a dataset until its ingest ends (ready or failed), with a progress bar of the files
    decoded on stderr (none when ``quiet``)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    dataset_id = ds["id"]
    progress = Progress(TextColumn("[bold]{task.description:>9}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("files {task.fields[info]}"),
                        TimeElapsedColumn(), console=_err(), disable=quiet)
    try:
        with progress:
            task = progress.add_task(ds["status"], total=None, info="")
            while True:
                p, rejected = ds.get("progress") or {}, len(ds.get("rejected") or {})
                progress.update(task, description=ds["status"], completed=p.get("done", 0),
                                total=p.get("total") or None,
                                info=f"({rejected} rejected)" if rejected else "")
                if ds["status"] != "ingesting":
                    return ds
                time.sleep(poll)
                ds = client.get(f"/v1/datasets/{dataset_id}")
    except KeyboardInterrupt:
        _err().print(f"stopped waiting; dataset {dataset_id} goes on ingesting on the server "
                     f"('facegrad dataset show {dataset_id}')")
        raise typer.Exit(130) from None


def ready_dataset(client: Client, dataset_id: str, poll: float, quiet: bool) -> dict:
    """The dataset, once ready: one still ingesting is followed (jobs are refused until it is
    ready), a failed one is a ClientError with its reason."""
    ds = client.get(f"/v1/datasets/{dataset_id.lower()}")
    if ds.get("status") == "ingesting":
        if not quiet:
            _err().print(f"dataset {ds['id']} is still ingesting; waiting until it is ready")
        ds = follow_ingest(client, ds, poll, quiet)
    if ds.get("status") == "failed":
        raise ClientError(f"dataset {ds['id']} failed to ingest: "
                          f"{ds.get('error') or 'no reason given'}")
    return ds


dataset_app = typer.Typer(help="Upload and list face datasets.", no_args_is_help=True)


@dataset_app.command("upload")
@handled
def dataset_upload(
    path: Annotated[Path, typer.Argument(
        exists=True, help="A folder of identity folders (zipped in memory), a .zip, or a .npz "
        "with 'images' and 'labels'.")],
    name: Annotated[str | None, typer.Option(help="Dataset name (default: the file name).")]
    = None,
    detect: Annotated[Detect | None, typer.Option(
        help="'auto' crops the face in each photo; 'none' uses images as they are "
        "(default: the server's).")] = None,
    wait: Annotated[bool, typer.Option(
        "--wait/--no-wait", help="Follow the ingest (decoding, face detection) with a progress "
        "bar until the dataset is ready; exit 1 if it fails. --no-wait returns once the upload "
        "is accepted.")] = True,
    poll: Annotated[float, typer.Option(help="Seconds between polls while following.")] = 1.0,
    url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False,
):
    """Upload a labelled dataset: DIR (one sub-folder per identity), ZIP or NPZ."""
    err = _err()
    if path.is_dir():
        blob, n, skipped = zip_folder(path)
        filename = f"{path.resolve().name or 'dataset'}.zip"
        if not as_json:
            err.print(f"zipped {n} images from {path}"
                      + (f" ({skipped} other files left out)" if skipped else ""))
    elif path.suffix.lower() in (".zip", ".npz"):
        blob, filename = path.read_bytes(), path.name
    else:
        raise ClientError(f"{path}: expected a folder, a .zip or a .npz")
    data = {}
    if name:
        data["name"] = name
    elif path.is_dir():
        data["name"] = path.resolve().name
    if detect:
        data["detect"] = detect.value
    client = Client(url, api_key)
    # answered at once (202, the dataset ingesting); the ingest is followed here
    ds = client.post("/v1/datasets", files={"file": (filename, blob)}, data=data,
                     headers={"Prefer": "respond-async"})
    if wait and ds.get("status") == "ingesting":
        if not as_json:
            err.print(f"dataset {ds['id']} uploaded; ingesting its images")
        ds = follow_ingest(client, ds, poll, quiet=as_json)
    if as_json:
        print_json(ds)
    elif ds.get("status") == "ingesting":
        _out().print(f"dataset [bold]{ds['id']}[/] {_ingest_text(ds)} files; follow it with "
                     f"'facegrad dataset show {ds['id']}'")
    else:
        show_dataset(ds, _out())
    if ds.get("status") == "failed":
        raise ClientError(f"dataset {ds['id']} failed to ingest: "
                          f"{ds.get('error') or 'no reason given'}")


@dataset_app.command("list")
@handled
def dataset_list(limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
                 url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False):
    """List datasets, newest first."""
    doc = Client(url, api_key).get("/v1/datasets", params={"limit": limit})
    if as_json:
        return print_json(doc)
    t = Table("id", "name", "status", "identities", "images", "detect", "rejected", "created",
              title=f"{doc['total']} datasets")
    for d in doc["items"]:
        t.add_row(d["id"], d["name"], _ingest_text(d), str(d["num_identities"]),
                  str(d["num_images"]), d.get("detect", "-"), str(len(d.get("rejected") or {})),
                  _when(d["created_at"]))
    _out().print(t)


@dataset_app.command("show")
@handled
def dataset_show(dataset_id: Annotated[str, typer.Argument(help="Dataset id.")],
                 url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False):
    """One dataset: status (ingest progress), identities and counts, rejected files,
    warnings."""
    ds = Client(url, api_key).get(f"/v1/datasets/{dataset_id}")
    print_json(ds) if as_json else show_dataset(ds, _out())
