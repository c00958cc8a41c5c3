"""Client commands of the ``facegrad`` CLI: talk to a running server over its REST API.

``facegrad dataset upload|list|show``, ``facegrad train``, ``facegrad jobs list|show|metrics|
cancel``, ``facegrad sweep`` (start a grid of jobs) and ``facegrad sweep list|show|cancel``,
``facegrad identify`` and ``facegrad models list``. Every command takes ``--url``
(``FACEGRAD_URL``), ``--api-key`` (``FACEGRAD_API_KEY``) and ``--json`` (print the server's JSON
instead of tables). Exit status 0 on success, 1 when the server refuses or cannot be reached (its
``detail`` on stderr), 2 for a bad command line.

The HTTP client is :mod:`.client`; the command groups are :mod:`.datasets`, :mod:`.jobs`
(``train`` and ``jobs``), :mod:`.sweeps`, :mod:`.identify` and :mod:`.models`; what they share
is in :mod:`.common`, and ``--clip``/``--arch`` (read from the registries) in :mod:`.specs`.
"""

from __future__ import annotations

import typer

from facegrad.service.client_cli.common import PANEL
from facegrad.service.client_cli.datasets import dataset_app
from facegrad.service.client_cli.identify import identify
from facegrad.service.client_cli.jobs import jobs_app, train
from facegrad.service.client_cli.models import models_app
from facegrad.service.client_cli.specs import (  # noqa: F401 (the specs' readers, for callers)
    RegistryHelpCommand,
    arch_choices,
    arch_help,
    clip_help,
    parse_clip,
)
from facegrad.service.client_cli.sweeps import sweep_app


def register(cli: typer.Typer) -> None:
    """Add the client commands to the ``facegrad`` app."""
    cli.add_typer(dataset_app, name="dataset", rich_help_panel=PANEL)
    cli.command("train", rich_help_panel=PANEL, cls=RegistryHelpCommand)(train)
    cli.add_typer(jobs_app, name="jobs", rich_help_panel=PANEL)
    cli.add_typer(sweep_app, name="sweep", rich_help_panel=PANEL)
    cli.command("identify", rich_help_panel=PANEL)(identify)
    cli.add_typer(models_app, name="models", rich_help_panel=PANEL)
