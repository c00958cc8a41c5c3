"""``facegrad sweep`` (start a grid of jobs) and ``facegrad sweep list|show|cancel``."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from facegrad.service.client_cli.client import DEFAULT_URL, Client, ClientError
from facegrad.service.client_cli.common import (
    SWEEP_FINAL,
    Device,
    JsonOpt,
    KeyOpt,
    Optim,
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
from facegrad.service.client_cli.specs import RegistryHelpGroup, check_arch, parse_clip

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
    cls=RegistryHelpGroup,
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
        "--clip", help="A clipping rule to compare; repeat it (the registered modes are listed "
        "in --help). Default: the server's.")] = None,
    lr: Annotated[list[float] | None, typer.Option(
        "--lr", help="A learning rate to compare; repeat it (--lr 0.01 --lr 0.1). Default: "
        "the architecture's.")] = None,
    seeds: Annotated[int, typer.Option(
        min=1, help="Runs per setting, with seeds 0..N-1 (mean ± sd over them).")] = 1,
    arch: Annotated[str | None, typer.Option(
        "--arch", callback=check_arch,
        help="An architecture (listed in --help).")] = None,
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
    for key, val in (("architecture", arch), ("epochs", epochs),
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
