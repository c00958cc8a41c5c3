#!/usr/bin/env python3
"""The two quick-start commands, on a machine that has only Python 3.10+.

    python3 dev.py up      # installs what is needed into .venv, then runs API + worker
    python3 dev.py test    # installs test tools too (and, as root on Debian, the chromium
                           # package for the browser test), then runs the whole test suite

Anything after the command is passed on (`python3 dev.py up --port 9000`,
`python3 dev.py test -k clipping`). Standard library only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
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


def ensure_chromium() -> None:
    """Best effort, for the browser test: Debian's chromium + chromium-driver when running as
    root on Debian and /usr/bin/chromium is missing (FACEGRAD_NO_APT=1 skips it). Quiet and
    never fatal: without Chromium that one test is skipped, saying why."""
    if (Path("/usr/bin/chromium").exists() or os.environ.get("FACEGRAD_NO_APT") == "1"
            or not hasattr(os, "geteuid") or os.geteuid() != 0
            or not Path("/etc/debian_version").exists() or not shutil.which("apt-get")):
        return
    print("installing Debian's chromium for the browser test (apt-get, best effort) ...",
          flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        for cmd in (["apt-get", "update", "-qq"],
                    ["apt-get", "install", "-y", "-qq", "--no-install-recommends", "chromium",
                     "chromium-driver"]):
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                           timeout=900, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"  chromium not installed ({type(e).__name__}); the browser test will be "
              "skipped", flush=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("up", "test"):
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "up":
        ensure_venv("")
        return subprocess.call([str(BIN / "facegrad"), "up", *rest], cwd=ROOT)
    ensure_venv("test")
    ensure_chromium()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.call([str(PY), "-m", "pytest", *rest], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
