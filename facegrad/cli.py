"""The ``facegrad`` command: run the service (serve, worker, up) and talk to it (client commands
from :mod:`facegrad.service.client_cli`: dataset, train, jobs, sweep, identify, models).

At the top of the layers: it starts the API (``app``) and the Celery worker (``worker``), which
sit above :mod:`facegrad.service`."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import typer

from facegrad.service.client_cli import register as register_client_commands

cli = typer.Typer(help="facegrad: face-recognition training with controlled gradient clipping.",
                  no_args_is_help=True, add_completion=False)
register_client_commands(cli)


def _env_with(host: str | None = None, port: int | None = None) -> dict:
    env = dict(os.environ)
    if host:
        env["FACEGRAD_HOST"] = host
    if port:
        env["FACEGRAD_PORT"] = str(port)
    return env


@cli.command()
def serve(host: str = typer.Option(None, help="Address to listen on (default 127.0.0.1)."),
          port: int = typer.Option(None, help="Port (default 8000)."),
          workers: int = typer.Option(1, help="API processes.")):
    """Run the HTTP API."""
    import uvicorn

    from facegrad.service.logging_setup import setup_logging
    from facegrad.service.settings import get_settings

    os.environ.update(_env_with(host, port))
    get_settings.cache_clear()
    settings = get_settings()
    setup_logging(settings.log_json)
    uvicorn.run("app.main:create_app", factory=True, host=settings.host, port=settings.port,
                workers=workers, log_level="info", timeout_graceful_shutdown=5)


@cli.command()
def worker(name: str = typer.Option("facegrad@%h", help="Celery node name."),
           loglevel: str = typer.Option("INFO")):
    """Run one Celery training worker (one per GPU)."""
    from facegrad.service.logging_setup import setup_logging
    from facegrad.service.settings import get_settings

    settings = get_settings()
    setup_logging(settings.log_json)
    from facegrad.service.worker_metrics import serve as serve_metrics
    from worker.celery_app import QUEUE, celery_app

    serve_metrics(settings.worker_metrics_port, settings.host)

    celery_app.worker_main(["worker", "--pool", "solo", "--concurrency", "1", "-Q", QUEUE,
                            "-n", name, "--loglevel", loglevel, "--without-gossip",
                            "--without-mingle"])


@cli.command()
def up(host: str = typer.Option(None, help="Address the API listens on (default 127.0.0.1)."),
       port: int = typer.Option(None, help="API port (default 8000)."),
       workers: int = typer.Option(1, help="Training workers to start.")):
    """Run the API and training worker(s) together (the quick-start command)."""
    from worker.queue import declare_queue

    env = _env_with(host, port)
    exe = [sys.executable, "-m", "facegrad.cli"]
    declare_queue()  # before the processes that would race to create it
    procs = [subprocess.Popen(exe + ["serve"], env=env)]
    metrics_port = env.get("FACEGRAD_WORKER_METRICS_PORT", "").strip()
    for i in range(workers):  # worker i serves its metrics on FACEGRAD_WORKER_METRICS_PORT + i
        wenv = dict(env, FACEGRAD_WORKER_METRICS_PORT=str(int(metrics_port) + i)) \
            if metrics_port.isdigit() else env
        procs.append(subprocess.Popen(exe + ["worker", "--name", f"facegrad{i}@%h"], env=wenv))

    def stop(*_):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + 15
        for p in procs:
            try:
                p.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    while True:
        for p in procs:
            if p.poll() is not None:
                typer.echo(f"a facegrad process exited with code {p.returncode}; stopping",
                           err=True)
                stop()
        time.sleep(1)


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
