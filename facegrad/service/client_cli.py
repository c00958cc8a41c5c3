"""Client commands of the ``facegrad`` CLI: talk to a running server over its REST API.

``facegrad dataset upload|list|show``, ``facegrad train``, ``facegrad jobs list|show|metrics|
cancel``, ``facegrad sweep`` (start a grid of jobs) and ``facegrad sweep list|show|cancel``,
``facegrad identify`` and ``facegrad models list``. Every command takes ``--url``
(``FACEGRAD_URL``), ``--api-key`` (``FACEGRAD_API_KEY``) and ``--json`` (print the server's JSON
instead of tables). Exit status 0 on success, 1 when the server refuses or cannot be reached (its
``detail`` on stderr), 2 for a bad command line.
"""

from __future__ import annotations

import functools
import io
import json
import sys
import time
import zipfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

DEFAULT_URL = "http://127.0.0.1:8000"
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


class Arch(str, Enum):
    dlib_resnet = "dlib_resnet"
    facenet_s = "facenet_s"
    seed_cnn = "seed_cnn"


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


class ClientError(Exception):
    """A failure to report on stderr with exit status 1."""


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


# --- --clip SPEC ------------------------------------------------------------------------------

def _value(text: str):
    t = text.strip()
    if t.lower() in ("true", "false"):
        return t.lower() == "true"
    if t.lower() in ("inf", "nan", "infinity"):
        return t.lower()
    for cast in (int, float):
        try:
            return cast(t)
        except ValueError:
            pass
    return t


def parse_clip(spec: str) -> dict:
    """``norm:5``, ``norm:5:per_tensor``, ``value:1``, ``threshold:0.9``, ``agc:0.01``,
    ``autoclip:10``, ``none`` (each registered mode's spelling, facegrad.clipping.modes); any
    field also as ``key=value`` (``norm:5:norm_type=inf``) and ``skip``/``fail`` for
    on_nonfinite. The first bare number is the mode's main parameter (its knob)."""
    from facegrad.clipping.modes import CLIP_MODES

    parts = [p.strip() for p in spec.split(":")]
    mode = parts[0].lower()
    if mode not in CLIP_MODES:
        examples = ", ".join(m.cli for m in CLIP_MODES.values())
        raise typer.BadParameter(f"unknown clip mode {parts[0]!r}; one of "
                                 f"{', '.join(CLIP_MODES)} (e.g. {examples})",
                                 param_hint="--clip")
    entry = CLIP_MODES[mode]
    fields = entry.config.model_fields
    # the knob first: a bare number sets it
    params = [n for n in fields if n not in ("mode", "on_nonfinite")]
    if entry.knob in params:
        params.remove(entry.knob)
        params.insert(0, entry.knob)
    out: dict[str, Any] = {"mode": mode}
    for part in parts[1:]:
        if not part:
            continue
        if "=" in part:
            key, val = (s.strip() for s in part.split("=", 1))
            if key not in fields or key == "mode":
                raise typer.BadParameter(
                    f"clip mode {mode!r} has no parameter {key!r}; it takes "
                    f"{', '.join(params + ['on_nonfinite']) or 'only on_nonfinite'}",
                    param_hint="--clip")
            out[key] = _value(val)
        elif part in ("global", "per_tensor") and "scope" in fields:
            out["scope"] = part
        elif part in ("skip", "fail"):
            out["on_nonfinite"] = part
        elif params and params[0] not in out and isinstance(_value(part), int | float):
            out[params[0]] = _value(part)
        else:
            raise typer.BadParameter(f"cannot read {part!r} in {spec!r}; clip mode {mode!r} "
                                     f"takes {', '.join(params) or 'no parameter'}",
                                     param_hint="--clip")
    return out


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


# --- training ---------------------------------------------------------------------------------

def _job_line(job: dict) -> str:
    p, m, c = job.get("progress") or {}, job.get("metrics") or {}, job.get("clipping") or {}
    bits = [f"epoch {p.get('epoch', 0)}/{p.get('epochs', '?')}"]
    if m.get("train_loss") is not None:
        bits.append(f"loss {_f(m['train_loss'])}")
    if m.get("train_acc") is not None:
        bits.append(f"acc {_pct(m['train_acc'])}")
    if m.get("val_acc") is not None:
        bits.append(f"val_acc {_pct(m['val_acc'])}")
    if c.get("steps"):
        bits.append(f"clipped {_pct(c.get('clip_fraction'))}")
    return "  ".join(bits)


def wait_for(client: Client, job: dict, poll: float, quiet: bool) -> dict:
    """Poll the job until it ends, with a live progress bar on stderr (none when ``quiet``)."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

    job_id = job["id"]
    progress = Progress(TextColumn("[bold]{task.description:>9}"), BarColumn(),
                        TaskProgressColumn(), TextColumn("{task.fields[info]}"),
                        TimeElapsedColumn(), console=_err(), disable=quiet)
    try:
        with progress:
            task = progress.add_task(job["status"], total=1.0, info=_job_line(job))
            while True:
                progress.update(task, description=job["status"],
                                completed=(job.get("progress") or {}).get("fraction", 0.0),
                                info=_job_line(job))
                if job["status"] in TERMINAL:
                    return job
                time.sleep(poll)
                job = client.get(f"/v1/jobs/{job_id}")
    except KeyboardInterrupt:
        _err().print(f"stopped waiting; job {job_id} goes on on the server "
                     f"('facegrad jobs show {job_id}', 'facegrad jobs cancel {job_id}')")
        raise typer.Exit(130) from None


def train(
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="Dataset id.")],
    arch: Annotated[Arch | None, typer.Option(
        "--arch",
        help="dlib_resnet (default: pretrained, fine-tuned), facenet_s or seed_cnn.")] = None,
    clip: Annotated[str | None, typer.Option(
        help="Clipping rule: norm:5 | norm:5:per_tensor | value:1 | threshold:0.9 | agc:0.01 | "
        "autoclip:10 | none; more fields as key=value (norm:5:norm_type=inf). "
        "Default: the server's (norm:5).")] = None,
    epochs: Annotated[int | None, typer.Option(
        help="Epochs (server default: 4 for dlib_resnet, 60 otherwise; 0: dlib_resnet as "
        "it is).")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Learning rate.")] = None,
    optimizer: Annotated[Optim | None, typer.Option(help="sgd, adam or adamw.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Square input side, 32-256.")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed.")] = None,
    device: Annotated[Device | None, typer.Option(
        help="auto (default: CUDA when the worker has it), cpu or cuda.")] = None,
    devices: Annotated[int | None, typer.Option(
        help="Processes that train the job together, one per GPU (default: every GPU of the "
        "worker; 1 on a CPU worker).")] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Follow the job with a progress bar until it ends; exit 1 unless it "
        "succeeds.")] = False,
    poll: Annotated[float, typer.Option(help="Seconds between polls with --wait.")] = 1.0,
    url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False,
):
    """Start a training job (and with --wait follow it to the end)."""
    body: dict[str, Any] = {"dataset_id": dataset}
    for key, val in (("architecture", arch.value if arch else None), ("epochs", epochs),
                     ("learning_rate", lr), ("batch_size", batch_size),
                     ("image_size", image_size), ("seed", seed),
                     ("device", device.value if device else None), ("devices", devices)):
        if val is not None:
            body[key] = val
    if optimizer:
        body["optimizer"] = {"name": optimizer.value}
    if clip:
        body["clip"] = parse_clip(clip)
    _train(body, wait, poll, url, api_key, as_json)


@handled
def _train(body: dict, wait: bool, poll: float, url: str, api_key: str | None,
           as_json: bool) -> None:
    client = Client(url, api_key)
    ready_dataset(client, body["dataset_id"], poll, quiet=as_json)
    job = client.post("/v1/jobs", json=body)
    if not wait:
        if as_json:
            return print_json(job)
        _out().print(f"job [bold]{job['id']}[/] {job['status']} (clip "
                     f"{clip_text(job['config'].get('clip'))}); follow it with "
                     f"'facegrad jobs show {job['id']}'")
        return
    if not as_json:
        _err().print(f"job {job['id']} {job['status']}: {job['config'].get('architecture')}, "
                     f"{job['config'].get('epochs')} epochs, clip "
                     f"{clip_text(job['config'].get('clip'))}")
    job = wait_for(client, job, poll, quiet=as_json)
    if as_json:
        print_json(job)
    elif job["status"] == "succeeded":
        show_job(job, [], _out())
    if job["status"] == "failed":
        raise ClientError(f"job {job['id']} failed: {job.get('error') or 'no reason given'}")
    if job["status"] == "cancelled":
        raise ClientError(f"job {job['id']} was cancelled")


# --- jobs -------------------------------------------------------------------------------------

def show_job(job: dict, history: list[dict], console: Console) -> None:
    cfg, m, c = job.get("config") or {}, job.get("metrics") or {}, job.get("clipping") or {}
    style = {"succeeded": "green", "failed": "red", "cancelled": "yellow"}.get(job["status"], "")
    t = Table(show_header=False, box=None)
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("job", job["id"]),
        ("status", f"[{style}]{job['status']}[/]" if style else job["status"]),
        ("dataset", job["dataset_id"]),
        ("model", job.get("model_id") or "-"),
        ("training", f"{cfg.get('architecture')}, {cfg.get('epochs')} epochs, batch "
                     f"{cfg.get('batch_size')}, lr {cfg.get('learning_rate')}, "
                     f"{(cfg.get('optimizer') or {}).get('name')}, image {cfg.get('image_size')}"),
        ("clip", clip_text(cfg.get("clip"))),
        ("progress", _job_line(job)),
        ("metrics", f"train loss {_f(m.get('train_loss'))}, acc {_pct(m.get('train_acc'))}; "
                    f"val loss {_f(m.get('val_loss'))}, acc {_pct(m.get('val_acc'))}"),
        ("clipping", f"{c.get('clipped_steps', 0)}/{c.get('steps', 0)} steps clipped "
                     f"({_pct(c.get('clip_fraction'))}), {c.get('skipped_steps', 0)} skipped; "
                     f"grad norm pre mean {_f((c.get('grad_norm_pre') or {}).get('mean'))} max "
                     f"{_f((c.get('grad_norm_pre') or {}).get('max'))}, post mean "
                     f"{_f((c.get('grad_norm_post') or {}).get('mean'))}; threshold "
                     f"{_f(c.get('threshold'))}"),
        ("created", _when(job.get("created_at"))),
        ("finished", _when(job.get("finished_at"))),
    ]
    ft = (m.get("open_set") or {}).get("fine_tuning") or {}
    if ft.get("pretrained") and ft.get("fine_tuned"):
        def v(f):
            return (f"verify {_pct(f.get('verify_accuracy'))}, TAR@FAR1% "
                    f"{_pct(f.get('verify_tar_at_far_0.01'))}")
        rows.insert(-2, ("held-out people", f"{len(ft.get('held_out') or [])}: pretrained "
                         f"{v(ft['pretrained'])} -> fine-tuned {v(ft['fine_tuned'])}; kept "
                         f"{ft.get('kept', '-').replace('_', '-')}"))
    if job.get("error"):
        rows.append(("error", f"[red]{job['error']}[/]"))
    if job.get("attempts", 1) > 1:
        rows.append(("attempts", f"{job['attempts']} (resumed from epoch "
                                 f"{job.get('resumed_from_epoch')})"))
    info = job.get("info") or {}
    if info.get("processes"):
        rows.append(("trained on", f"{info['processes']} process(es), {info.get('device')}"))
    if info.get("earlier_attempt"):
        rows.append(("earlier attempt", info["earlier_attempt"]))
    for k, v in rows:
        t.add_row(k, v)
    console.print(t)
    if history:
        h = Table("epoch", "train loss", "train acc", "val loss", "val acc", "clipped",
                  "norm pre mean", "norm pre max", "norm post mean", "threshold", "seconds")
        for r in history:
            cl = r.get("clipping") or {}
            pre, post = cl.get("grad_norm_pre") or {}, cl.get("grad_norm_post") or {}
            h.add_row(str(r["epoch"]), _f(r.get("train_loss")), _pct(r.get("train_acc")),
                      _f(r.get("val_loss")), _pct(r.get("val_acc")), _pct(cl.get("clip_fraction")),
                      _f(pre.get("mean")), _f(pre.get("max")), _f(post.get("mean")),
                      _f(cl.get("threshold")), _f(r.get("epoch_seconds"), 3))
        console.print(h)


jobs_app = typer.Typer(help="List, inspect and cancel training jobs.", no_args_is_help=True)


@jobs_app.command("list")
@handled
def jobs_list(status: Annotated[Status | None, typer.Option(help="Only jobs in this state.")]
              = None,
              limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
              url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False):
    """List jobs, newest first."""
    params: dict[str, Any] = {"limit": limit}
    if status:
        params["status"] = status.value
    doc = Client(url, api_key).get("/v1/jobs", params=params)
    if as_json:
        return print_json(doc)
    t = Table("id", "status", "dataset", "arch", "clip", "progress", "val acc", "created",
              "model", title=f"{doc['total']} jobs")
    for j in doc["items"]:
        p = j.get("progress") or {}
        t.add_row(j["id"], j["status"], j["dataset_id"][:8], j["config"].get("architecture"),
                  clip_text(j["config"].get("clip")),
                  f"{p.get('epoch', 0)}/{p.get('epochs', '?')}",
                  _pct((j.get("metrics") or {}).get("val_acc")), _when(j["created_at"]),
                  j.get("model_id") or "-")
    _out().print(t)


@jobs_app.command("show")
@handled
def jobs_show(job_id: Annotated[str, typer.Argument(help="Job id.")],
              url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False):
    """One job: status, settings, metrics, clipping totals and the per-epoch history."""
    client = Client(url, api_key)
    job = client.get(f"/v1/jobs/{job_id}")
    if as_json:
        return print_json(job)
    show_job(job, client.get(f"/v1/jobs/{job_id}/metrics")["history"], _out())


@jobs_app.command("metrics")
@handled
def jobs_metrics(job_id: Annotated[str, typer.Argument(help="Job id.")],
                 url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False):
    """A job's per-epoch history: losses, accuracies, clipping telemetry."""
    client = Client(url, api_key)
    doc = client.get(f"/v1/jobs/{job_id}/metrics")
    if as_json:
        return print_json(doc)
    show_job(client.get(f"/v1/jobs/{job_id}"), doc["history"], _out())


@jobs_app.command("cancel")
@handled
def jobs_cancel(job_id: Annotated[str, typer.Argument(help="Job id.")],
                url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False):
    """Cancel a job: a queued one at once, a running one at its next step."""
    job = Client(url, api_key).post(f"/v1/jobs/{job_id}/cancel")
    if as_json:
        return print_json(job)
    what = "cancelled" if job["status"] == "cancelled" else \
        "cancel requested; it stops at its next step"
    _out().print(f"job {job['id']}: {what}")


# --- sweeps -----------------------------------------------------------------------------------

PCT_METRICS = {"val_acc", "known_named", "strangers_rejected", "tpir_at_fpir_0.05",
               "clip_fraction"}
# the leaderboard columns after the ranking metric (that one is left out of them)
KEY_METRICS = ("val_acc", "best_val_loss", "epochs_to_90pct", "tpir_at_fpir_0.05",
               "clip_fraction", "grad_norm_pre", "grad_norm_post", "wall_seconds")
METRIC_HEADS = {"val_acc": "val acc", "best_val_loss": "best val loss",
                "final_val_loss": "final val loss", "epochs_to_90pct": "epochs to 90%",
                "known_named": "known named", "strangers_rejected": "strangers rejected",
                "tpir_at_fpir_0.05": "TPIR@FPIR.05", "clip_fraction": "clipped",
                "grad_norm_pre": "norm pre", "grad_norm_post": "norm post",
                "skipped_steps": "skipped", "wall_seconds": "seconds"}


def setting_text(setting: dict | None, label: str | None = None) -> str:
    """A leaderboard row's grid values: the server's ``label`` when it has one
    ('clip=norm:max_norm=5,scope=per_tensor; learning_rate=0.01'), else built here."""
    if label:
        return label
    parts = []
    for key, val in (setting or {}).items():
        if key == "clip":
            parts.append(clip_text(val))
        elif key == "learning_rate":
            parts.append(f"lr {val}")
        else:
            parts.append(f"{key} {json.dumps(val) if isinstance(val, dict | list) else val}")
    return ", ".join(parts) or "-"


def stat_text(name: str, stat: dict | None) -> str:
    """``mean ± sd`` of one metric over a setting's runs ('-' when no run has it)."""
    if not stat or stat.get("mean") is None:
        return "-"
    if name in PCT_METRICS:
        mean, sd = _pct(stat["mean"]), _pct(stat.get("sd"))
    else:
        mean, sd = _f(stat["mean"], 4), _f(stat.get("sd"), 2)
    return mean + (f" ± {sd}" if stat.get("sd") is not None and (stat.get("n") or 0) > 1
                   else "")


def _counts(sweep: dict) -> str:
    p = sweep.get("progress") or {}
    return ", ".join(f"{p[k]} {k}" for k in ("queued", "running", "succeeded", "failed",
                                              "cancelled") if p.get(k))


def sweep_line(sweep: dict) -> str:
    p = sweep.get("progress") or {}
    style = {"succeeded": "green", "partial": "yellow", "failed": "red",
             "cancelled": "yellow"}.get(sweep["status"], "")
    status = f"[{style}]{sweep['status']}[/]" if style else sweep["status"]
    return (f"sweep [bold]{sweep['id']}[/] {sweep.get('name')!r}: {status}, "
            f"{p.get('jobs', len(sweep.get('job_ids') or []))} jobs"
            + (f" ({_counts(sweep)})" if _counts(sweep) else "")
            + f", metric {sweep.get('metric')}")


def show_leaderboard(board: dict, console: Console) -> None:
    metric = board["metric"]
    others = [m for m in KEY_METRICS if m != metric]
    best = "highest" if board.get("direction", "max") == "max" else "lowest"
    t = Table(title=f"leaderboard by {metric} ({best} first; mean ± sd over the runs)")
    t.add_column("#", justify="right")
    t.add_column("setting", overflow="fold", min_width=24)
    for head in ("runs", "succeeded", "failed"):
        t.add_column(head, justify="right")
    t.add_column(METRIC_HEADS.get(metric, metric), justify="right", style="bold", no_wrap=True)
    for m in others:
        t.add_column(METRIC_HEADS.get(m, m), justify="right", no_wrap=True)
    for n, row in enumerate(board.get("rows") or [], 1):
        ms = row.get("metrics") or {}
        t.add_row(str(n), setting_text(row.get("setting"), row.get("label")),
                  str(row.get("runs", "-")),
                  str(row.get("succeeded", "-")), str(row.get("failed", "-")),
                  stat_text(metric, ms.get(metric)), *[stat_text(m, ms.get(m)) for m in others])
    console.print(t)


def wait_sweep(client: Client, sweep: dict, poll: float, quiet: bool) -> dict:
    """Poll the sweep until it is final, with a bar over its jobs on stderr (none if ``quiet``)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    sweep_id = sweep["id"]
    progress = Progress(TextColumn("[bold]{task.description:>9}"), BarColumn(),
                        MofNCompleteColumn(), TextColumn("jobs  {task.fields[info]}"),
                        TimeElapsedColumn(), console=_err(), disable=quiet)
    try:
        with progress:
            task = progress.add_task(sweep["status"], total=None, info="")
            while True:
                p = sweep.get("progress") or {}
                jobs = p.get("jobs") or len(sweep.get("job_ids") or []) or None
                done = sum(p.get(k) or 0 for k in ("succeeded", "failed", "cancelled"))
                progress.update(task, description=sweep["status"], total=jobs, completed=done,
                                info=_counts(sweep))
                if sweep["status"] in SWEEP_FINAL:
                    return sweep
                time.sleep(poll)
                sweep = client.get(f"/v1/sweeps/{sweep_id}")
    except KeyboardInterrupt:
        _err().print(f"stopped waiting; sweep {sweep_id} goes on on the server "
                     f"('facegrad sweep show {sweep_id}', 'facegrad sweep cancel {sweep_id}')")
        raise typer.Exit(130) from None


sweep_app = typer.Typer(
    help="Compare settings: start a sweep (a grid of clip modes x learning rates x seeds, one "
    "training job each) with 'facegrad sweep --dataset DS --clip none --clip norm:5 --seeds 3 "
    "--wait', then rank them with 'facegrad sweep show ID'.")


@sweep_app.callback(invoke_without_command=True)
def sweep(
    ctx: typer.Context,
    dataset: Annotated[str | None, typer.Option(
        "--dataset", "-d", help="Dataset id (starts a sweep; needed unless a command is "
        "given).")] = None,
    clip: Annotated[list[str] | None, typer.Option(
        "--clip", help="A clipping rule to compare; repeat it: --clip none --clip "
        "norm:5:per_tensor --clip threshold:0.9 (specs as in 'facegrad train'). Default: the "
        "server's.")] = None,
    lr: Annotated[list[float] | None, typer.Option(
        "--lr", help="A learning rate to compare; repeat it (--lr 0.01 --lr 0.1). Default: "
        "the architecture's.")] = None,
    seeds: Annotated[int, typer.Option(
        min=1, help="Runs per setting, with seeds 0..N-1 (mean ± sd over them).")] = 1,
    arch: Annotated[Arch | None, typer.Option(
        "--arch", help="dlib_resnet (server default), facenet_s or seed_cnn.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs of every job.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Square input side, 32-256.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size.")] = None,
    optimizer: Annotated[Optim | None, typer.Option(help="sgd, adam or adamw.")] = None,
    device: Annotated[Device | None, typer.Option(help="auto, cpu or cuda.")] = None,
    name: Annotated[str | None, typer.Option(
        help="Sweep name (default: made from the clip modes, learning rates and seeds).")]
    = None,
    metric: Annotated[str, typer.Option(
        help="Metric that ranks the settings (val_acc, best_val_loss, tpir_at_fpir_0.05, "
        "...).")] = "val_acc",
    wait: Annotated[bool, typer.Option(
        "--wait", help="Follow the sweep with a progress bar over its jobs, then print the "
        "leaderboard; exit 1 if it failed or was cancelled.")] = False,
    poll: Annotated[float, typer.Option(help="Seconds between polls with --wait.")] = 2.0,
    url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False,
):
    """Start a sweep (with --dataset), or: list, show ID, cancel ID."""
    if ctx.invoked_subcommand is not None:
        if dataset or clip or lr:
            raise typer.BadParameter(
                f"--dataset/--clip/--lr start a sweep: give them without "
                f"'{ctx.invoked_subcommand}'", param_hint="--dataset")
        return
    if dataset is None:
        if clip or lr:
            raise typer.BadParameter("the dataset to train on is needed to start a sweep",
                                     param_hint="--dataset")
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    base: dict[str, Any] = {"dataset_id": dataset}
    for key, val in (("architecture", arch.value if arch else None), ("epochs", epochs),
                     ("batch_size", batch_size), ("image_size", image_size),
                     ("device", device.value if device else None)):
        if val is not None:
            base[key] = val
    if optimizer:
        base["optimizer"] = {"name": optimizer.value}
    grid: dict[str, Any] = {}
    if clip:
        grid["clip"] = [parse_clip(c) for c in clip]
    if lr:
        grid["learning_rate"] = list(lr)
    grid["seed"] = list(range(seeds))
    if not name:
        name = "; ".join(filter(None, (
            "clip " + ", ".join(clip) if clip else "",
            "lr " + ", ".join(f"{x:g}" for x in lr) if lr else "",
            f"{seeds} seed{'s' if seeds > 1 else ''}")))[:200]
    body: dict[str, Any] = {"name": name, "base": base, "grid": grid, "metric": metric}
    _sweep_create(body, wait, poll, url, api_key, as_json)


@handled
def _sweep_create(body: dict, wait: bool, poll: float, url: str, api_key: str | None,
                  as_json: bool) -> None:
    client = Client(url, api_key)
    ready_dataset(client, body["base"]["dataset_id"], poll, quiet=as_json)
    sweep = client.post("/v1/sweeps", json=body)
    jobs = len(sweep.get("job_ids") or []) or (sweep.get("progress") or {}).get("jobs")
    if not wait:
        if as_json:
            return print_json(sweep)
        _out().print(f"sweep [bold]{sweep['id']}[/] {sweep['status']}: {jobs} jobs; follow it "
                     f"with 'facegrad sweep show {sweep['id']}'")
        return
    if not as_json:
        _err().print(f"sweep {sweep['id']} {sweep.get('name')!r} {sweep['status']}: {jobs} jobs")
    sweep = wait_sweep(client, sweep, poll, quiet=as_json)
    board = client.get(f"/v1/sweeps/{sweep['id']}/leaderboard",
                       params={"metric": sweep.get("metric") or body["metric"]})
    if as_json:
        print_json({**sweep, "leaderboard": board})
    else:
        out = _out()
        out.print(sweep_line(sweep))
        show_leaderboard(board, out)
    if sweep["status"] in ("failed", "cancelled"):
        raise ClientError(f"sweep {sweep['id']} {sweep['status']}"
                          + (f" ({_counts(sweep)})" if _counts(sweep) else ""))


@sweep_app.command("list")
@handled
def sweep_list(limit: Annotated[int, typer.Option(help="At most this many.")] = 50,
               url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False):
    """List sweeps, newest first."""
    doc = Client(url, api_key).get("/v1/sweeps", params={"limit": limit})
    if as_json:
        return print_json(doc)
    t = Table("id", "name", "status", "jobs", "done", "metric", "created", "finished",
              title=f"{doc.get('total', len(doc['items']))} sweeps")
    for s in doc["items"]:
        p = s.get("progress") or {}
        done = sum(p.get(k) or 0 for k in ("succeeded", "failed", "cancelled"))
        t.add_row(s["id"], s.get("name") or "-", s["status"],
                  str(p.get("jobs", len(s.get("job_ids") or []))), str(done),
                  s.get("metric") or "-", _when(s.get("created_at")),
                  _when(s.get("finished_at")))
    _out().print(t)


@sweep_app.command("show")
@handled
def sweep_show(
    sweep_id: Annotated[str, typer.Argument(help="Sweep id.")],
    metric: Annotated[str | None, typer.Option(
        help="Rank by this metric (default: the sweep's).")] = None,
    csv: Annotated[bool, typer.Option("--csv", help="Print the leaderboard as CSV.")] = False,
    url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False,
):
    """One sweep: its status and the leaderboard of its settings (mean ± sd over seeds)."""
    client = Client(url, api_key)
    params = {"metric": metric} if metric else {}
    if csv:
        text = client.get(f"/v1/sweeps/{sweep_id}/leaderboard",
                          params={**params, "format": "csv"}, raw=True)
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    sweep = client.get(f"/v1/sweeps/{sweep_id}")
    board = client.get(f"/v1/sweeps/{sweep_id}/leaderboard", params=params)
    if as_json:
        return print_json({**sweep, "leaderboard": board})
    out = _out()
    out.print(sweep_line(sweep))
    show_leaderboard(board, out)


@sweep_app.command("cancel")
@handled
def sweep_cancel(sweep_id: Annotated[str, typer.Argument(help="Sweep id.")],
                 url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False):
    """Cancel a sweep: its queued jobs at once, its running job at its next step."""
    sweep = Client(url, api_key).post(f"/v1/sweeps/{sweep_id}/cancel")
    if as_json:
        return print_json(sweep)
    _out().print(f"sweep {sweep['id']}: cancel requested; now {sweep['status']}"
                 + (f" ({_counts(sweep)})" if _counts(sweep) else ""))


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


def register(cli: typer.Typer) -> None:
    """Add the client commands to the ``facegrad`` app."""
    cli.add_typer(dataset_app, name="dataset", rich_help_panel=PANEL)
    cli.command("train", rich_help_panel=PANEL)(train)
    cli.add_typer(jobs_app, name="jobs", rich_help_panel=PANEL)
    cli.add_typer(sweep_app, name="sweep", rich_help_panel=PANEL)
    cli.command("identify", rich_help_panel=PANEL)(identify)
    cli.add_typer(models_app, name="models", rich_help_panel=PANEL)
