"""Shared helpers for the bench/ scripts: paths, ORL loading, interleaved timing, tables.

Every benchmark measures its baseline in the same run as its candidate, interleaving their
repetitions and comparing medians, because the machine's CPUs are shared and timings drift.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

ORL = ROOT.parent / "shared" / "data" / "att_faces"


# --- machine ----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def code_state() -> str:
    """The commit measured, and how many tracked files differ from it."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                              capture_output=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--name-only", "HEAD"], cwd=ROOT, text=True,
                               capture_output=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head or 'unknown'}" + (f" + {len(dirty)} modified files" if dirty else "")


def header(title: str, device: torch.device | None = None) -> None:
    """The first lines every benchmark prints: what ran where, and how busy the machine was."""
    print(f"== {title} ==")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}  python {platform.python_version()}  "
          f"torch {torch.__version__}  code: {code_state()}")
    dev = f"  device: {device}" if device is not None else ""
    if device is not None and device.type == "cuda":
        dev += f" ({torch.cuda.get_device_name(device)})"
    print(f"cpu: {cpu_model()} x{os.cpu_count()}  torch threads: {torch.get_num_threads()}"
          f"{dev}  load average: {loadavg()}")
    sys.stdout.flush()


def footer() -> None:
    print(f"load average at the end: {loadavg()} (above {os.cpu_count()} means other processes "
          "shared the CPUs during the run)")


def device_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: AMP (bf16, or fp16 with a scaler) and channels_last, as the service")
    p.add_argument("--threads", type=int, default=0,
                   help="torch intra-op threads for every variant (default: torch's, one per "
                   "core); 1 gives steadier figures when other processes load the CPUs")
    return p


def setup(args: argparse.Namespace) -> torch.device:
    """Apply --threads, check --device; returns the device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return pick_device(args.device)


def pretrained_dir() -> Path:
    """Where the service keeps dlib's converted weights (``<data dir>/pretrained``, from the
    FACEGRAD_* settings): the benchmarks train and embed with the same files."""
    from facegrad.service.settings import get_settings
    from facegrad.service.storage import pretrained_dir as service_pretrained_dir

    return service_pretrained_dir(get_settings())


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU here")
    return torch.device(name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def box_agreement(pairs, noise: float = 1e-3) -> tuple[int, float, int]:
    """How far two face detectors agree, over pictures: ``pairs`` holds, per picture, each
    detector's [(box, score)]. Boxes scoring within ``noise`` of the threshold (0) may fall either
    side of it on other hardware, so only firmer ones count. Returns (pictures with the same
    firm boxes, the largest score difference of a box both found, firm boxes of the second)."""
    same, worst, found = 0, 0.0, 0
    for a, b in pairs:
        fa = {r: c for r, c in a if c > noise}
        fb = {r: c for r, c in b if c > noise}
        same += fa.keys() == fb.keys()
        found += len(fb)
        worst = max([worst] + [abs(fa[r] - fb[r]) for r in fb if r in fa])
    return same, worst, found


# --- timing -----------------------------------------------------------------------------------

def median(xs) -> float:
    return statistics.median(xs) if xs else float("nan")


def pct(xs, q: float) -> float:
    return float(np.percentile(np.asarray(xs, dtype=float), q)) if len(xs) else float("nan")


def interleave(variants: dict[str, Callable[[], float]], rounds: int,
               baseline: str | None = None) -> dict[str, dict]:
    """Run each variant once per round, in a rotating order; each call returns seconds.

    Returns per variant ``{"times": [...], "median": s, "ratio": median over rounds of
    time/baseline-time-in-the-same-round}`` (ratio only when ``baseline`` is given).
    """
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(variants[n]())
    out = {}
    for n in names:
        d = {"times": times[n], "median": median(times[n])}
        if baseline is not None:
            d["ratio"] = median([t / b for t, b in zip(times[n], times[baseline])])
        out[n] = d
    return out


# --- output -----------------------------------------------------------------------------------

def table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(c) -> str:
    if isinstance(c, float):
        if c != c:
            return "n/a"
        return f"{c:.3f}" if abs(c) < 100 else f"{c:.0f}"
    return str(c)


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


# --- data -------------------------------------------------------------------------------------

def orl_split(k_test: int = 3, seed: int = 1234):
    """testkit/harness.py's split: per identity, random.Random(1234) shuffle, first 3 for test."""
    from testkit.harness import orl_split as split

    if not ORL.is_dir():
        raise SystemExit(f"shared face data not found at {ORL}")
    return split(k_test, seed)


def crops_of(paths: list[Path]) -> np.ndarray:
    """Stored-format uint8 crops (N, 128, 128, 3), made as dataset building makes them."""
    from facegrad.data.imageio import decode_image
    from facegrad.recognition.detect import crop_one

    return np.stack([crop_one(decode_image(p.read_bytes(), filename=p.name), "auto")
                     for p in paths])


def face_arrays(folder: dict[str, list[Path]]):
    """A FaceArrays from {identity: [png paths]} (identities sorted, as dataset building does)."""
    from facegrad.data.store import FaceArrays

    names = sorted(folder)
    paths = [p for n in names for p in folder[n]]
    labels = np.array([i for i, n in enumerate(names) for _ in folder[n]], dtype=np.int64)
    return FaceArrays(crops_of(paths), labels, names)


def orl_all():
    """All 400 ORL images as a FaceArrays."""
    from testkit.harness import orl_folder

    if not ORL.is_dir():
        raise SystemExit(f"shared face data not found at {ORL}")
    return face_arrays(orl_folder())


# --- memory of a child process ----------------------------------------------------------------

def status_kb(pid: int | str, key: str) -> int:
    """A /proc/<pid>/status figure in kB (VmRSS, VmHWM, ...); 0 when absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def run_measured(cmd: list[str]) -> dict:
    """Run ``cmd``, a child that prints ``RESULT <json>`` last; its JSON, plus
    ``sampled_rss_kb``: its VmRSS sampled every 0.1 s, the peak (a check on its own VmHWM)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0}

    def sample():
        while proc.poll() is None:
            try:
                peak["rss"] = max(peak["rss"], status_kb(proc.pid, "VmRSS"))
            except (OSError, ValueError):
                pass
            time.sleep(0.1)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, _ = proc.communicate()
    t.join()
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"child failed ({proc.returncode}):\n{out[-3000:]}")
    res = json.loads(lines[-1][7:])
    res["sampled_rss_kb"] = peak["rss"]
    return res


def doc_section(path: Path, heading: str) -> list[str]:
    """The lines of markdown file ``path`` from the line ``heading`` to the end ([] when the file
    or the heading is absent): a section that another script writes and a rewrite keeps."""
    lines = path.read_text().split("\n") if path.is_file() else []
    return lines[lines.index(heading):] if heading in lines else []


def write_doc_section(path: Path, heading: str, section: list[str]) -> None:
    """Replace the section of ``path`` that starts at the line ``heading`` (to the next ``## ``
    heading, or the end of the file) by ``section``, or add it at the end."""
    lines = path.read_text().rstrip("\n").split("\n") if path.is_file() else []
    after: list[str] = []
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        lines, after = lines[:start], lines[end:]
    while lines and not lines[-1].strip():
        lines.pop()
    body = "\n".join(lines + [""] + section).rstrip("\n")
    path.write_text(body + ("\n\n" + "\n".join(after) if after else "").rstrip("\n") + "\n")


# docs/clipping-study.md: bench/clipping_study.py writes it, bench/finetune_sweep.py this section
# and bench/finetune_rotation.py the one after it
CFP_SECTION = "## Fine-tuning on turned faces (CFP), written by bench/finetune_sweep.py"
