"""The import layers of pyproject.toml's [tool.importlinter] hold: lint-imports passes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_hold():
    # the lint-imports beside this Python (the project's .venv), else one on PATH
    exe = Path(sys.executable).with_name("lint-imports")
    cmd = str(exe) if exe.exists() else shutil.which("lint-imports")
    if cmd is None:
        pytest.fail("lint-imports is missing: install the test extra (import-linter)")
    r = subprocess.run([cmd, "--no-cache"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
