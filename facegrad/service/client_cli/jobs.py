"""``facegrad train`` and ``facegrad jobs list|show|metrics|cancel``."""

from __future__ import annotations

import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from facegrad.service.client_cli.client import DEFAULT_URL, Client, ClientError
from facegrad.service.client_cli.common import (
    TERMINAL,
    Device,
    JsonOpt,
    KeyOpt,
    Optim,
    Status,
    UrlOpt,
    _err,
    _f,
    _out,
    _pct,
    _when,
    clip_text,
    handled,
    print_json,
)
from facegrad.service.client_cli.datasets import ready_dataset
from facegrad.service.client_cli.specs import check_arch, parse_clip

# --- training ---------------------------------------------------------------------------------

def _held_out_figures(f: dict) -> str:
    """One network's or descriptor's figures on the held-out people (open_set.among_themselves)."""
    return (f"verify {_pct(f.get('verify_accuracy'))}, TAR@FAR1% "
            f"{_pct(f.get('verify_tar_at_far_0.01'))}")


def _job_line(job: dict) -> str:
    p, m, c = job.get("progress") or {}, job.get("metrics") or {}, job.get("clipping") or {}
    bits = [f"epoch {p.get('epoch', 0)}/{p.get('epochs', '?')}"]
    if p.get("stage") not in (None, "training", "done"):  # a step after training
        bits.append(str(p["stage"]))
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
    arch: Annotated[str | None, typer.Option(
        "--arch", callback=check_arch,
        help="An architecture (listed in --help).")] = None,
    clip: Annotated[str | None, typer.Option(
        help="Clipping rule (the registered modes are listed in --help).")] = None,
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
    epsilon: Annotated[float | None, typer.Option(
        help="Train privately (DP-SGD, needs --clip per_example:C) to this epsilon.")] = None,
    noise: Annotated[float | None, typer.Option(
        help="Train privately with this noise multiplier (instead of --epsilon).")] = None,
    delta: Annotated[float | None, typer.Option(
        help="delta of a private job (server default 1e-5).")] = None,
    unit: Annotated[str | None, typer.Option(
        help="What a private job protects: person (default) or image.")] = None,
    wait: Annotated[bool, typer.Option(
        "--wait", help="Follow the job with a progress bar until it ends; exit 1 unless it "
        "succeeds.")] = False,
    poll: Annotated[float, typer.Option(help="Seconds between polls with --wait.")] = 1.0,
    url: UrlOpt = DEFAULT_URL, api_key: KeyOpt = None, as_json: JsonOpt = False,
):
    """Start a training job (and with --wait follow it to the end)."""
    body: dict[str, Any] = {"dataset_id": dataset}
    for key, val in (("architecture", arch), ("epochs", epochs),
                     ("learning_rate", lr), ("batch_size", batch_size),
                     ("image_size", image_size), ("seed", seed),
                     ("device", device.value if device else None), ("devices", devices)):
        if val is not None:
            body[key] = val
    if optimizer:
        body["optimizer"] = {"name": optimizer.value}
    if clip:
        body["clip"] = parse_clip(clip)
    privacy = {k: v for k, v in (("target_epsilon", epsilon), ("noise_multiplier", noise),
                                 ("delta", delta), ("unit", unit)) if v is not None}
    if privacy:
        body["privacy"] = privacy
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
    v = _held_out_figures
    if ft.get("pretrained") and ft.get("fine_tuned"):
        f = ft.get("in_fused") or {}  # descriptor 'auto' took fused: judged again beside SFace
        fused = (f"; beside SFace {v(f['pretrained'])} -> {v(f['fine_tuned'])}"
                 if f.get("pretrained") and f.get("fine_tuned") else "")
        rows.insert(-2, ("held-out people", f"{len(ft.get('held_out') or [])}: pretrained "
                         f"{v(ft['pretrained'])} -> fine-tuned {v(ft['fine_tuned'])}{fused}; "
                         f"kept {ft.get('kept', '-').replace('_', '-')}"))
    dc = (m.get("open_set") or {}).get("descriptor_choice") or {}
    if dc.get("flip_mean") and dc.get("fused"):
        rows.insert(-2, ("descriptor", f"flip_mean {v(dc['flip_mean'])} -> fused "
                         f"{v(dc['fused'])}; kept {dc.get('chosen', '-')}"))
    st = (m.get("open_set") or {}).get("sface_fine_tuning") or {}
    if st.get("pretrained") and st.get("fine_tuned"):
        rows.insert(-2, ("SFace", f"as it is {v(st['pretrained'])} -> fine-tuned "
                         f"{v(st['fine_tuned'])}; kept {st.get('kept', '-').replace('_', '-')}"))
        if st.get("refit"):
            rows.insert(-2, ("SFace refit", f"on every person: {st['refit'].get('people')} "
                             f"people, {st['refit'].get('photos')} photos, "
                             f"{st['refit'].get('seconds')} s"))
    elif st.get("note"):
        rows.insert(-2, ("SFace", st["note"]))
    ex = c.get("examples")
    if ex:
        rows.insert(-2, ("per example", f"{ex['clipped']}/{ex['count']} clipped "
                         f"({_pct(ex.get('clip_fraction'))}); norm pre mean "
                         f"{_f(ex.get('norm_mean'))} max {_f(ex.get('norm_max'))}"))
    if cfg.get("privacy"):
        rec = m.get("privacy")
        rows.insert(-2, ("privacy", (
            f"(epsilon {_f(rec['epsilon'])}, delta {rec['delta']:g})-DP per {rec['unit']}: "
            f"sigma {_f(rec['noise_multiplier'])}, q {_f(rec['sample_rate'])}, "
            f"{rec['steps_done']} steps, {rec['accountant']} accountant") if rec else (
            f"DP-SGD per {cfg['privacy'].get('unit', 'person')}, epsilon so far "
            f"{_f(m.get('epsilon'))}")))
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
