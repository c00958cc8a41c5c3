#!/usr/bin/env python3
"""The two quick-start commands, on a machine that has only Python 3.10+.

    python3 dev.py up      # installs what is needed into .venv, then runs API + worker
    python3 dev.py test    # installs test tools too, then runs the whole test suite

Anything after the command is passed on (`python3 dev.py up --port 9000`,
`python3 dev.py test -k clipping`). Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"


def ensure_venv(extras: str) -> None:
    """Create .venv and install the project (editable) once per pyproject.toml version."""
    if not PY.exists():
        print(f"creating {VENV} ...", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / f".installed-{extras or 'base'}"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    print("installing facegrad and its dependencies into .venv (first run only) ...", flush=True)
    spec = f".[{extras}]" if extras else "."
    subprocess.check_call([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"], cwd=ROOT)
    subprocess.check_call([str(PY), "-m", "pip", "install", "-q", "-e", spec], cwd=ROOT)
    stamp.write_text(digest)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "test"):
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "up":
        ensure_venv("")
        return subprocess.call([str(BIN / "facegrad"), "up", *rest], cwd=ROOT)
    ensure_venv("test")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.call([str(PY), "-m", "pytest", *rest], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
