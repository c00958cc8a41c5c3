"""Worker memory: peak RSS of one training run on a 1k- and a 10k-image dataset.

    .venv/bin/python bench/worker_memory.py [--threads N] [--arch facenet_s] [--sizes 1000 10000]

Datasets are synthesised from the 400 ORL faces (stored 150x150 RGB chips) by horizontal flips
and shifts of up to 12 px (edge-replicated), labelled with their 40 identities, and written as
the service stores a dataset (images.npy, labels.npy, names.json) in a temporary folder. Each
run is a fresh subprocess doing what a worker does for a job: ``FaceArrays.load`` (memory-mapped)
then ``facegrad.pipeline.run_training_job`` for 1 epoch with the default config (plus --arch); it
reports ``VmHWM`` from its /proc/<pid>/status as it ends, while this process samples its VmRSS. A
third subprocess only imports and loads (the baseline: what any worker holds before training).

Bar: peak RSS < 2 GB at 10k images. Also printed: the growth per 1k images between the sizes.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _common import (
    device_parser,
    footer,
    header,
    orl_all,
    pretrained_dir,
    run_measured,
    setup,
    status_kb,
    table,
    verdict,
)

import numpy as np  # isort: skip

BAR_MB = 2048.0
SHIFTS = [(0, 0)] + [(dx, dy) for r in (4, 8, 12) for dx, dy in
                     ((r, 0), (-r, 0), (0, r), (0, -r))]


def shifted(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """(N, S, S, 3) shifted by (dx, dy) pixels, edges replicated."""
    if dx == 0 and dy == 0:
        return images
    p = max(abs(dx), abs(dy))
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
    s = images.shape[1]
    return padded[:, p - dy:p - dy + s, p - dx:p - dx + s]


def synthesise(base, n: int, folder: Path) -> None:
    from facegrad.data.store import FaceArrays

    variants = [(flip, dx, dy) for dx, dy in SHIFTS for flip in (False, True)]
    need = -(-n // len(base.images))
    if need > len(variants):
        raise SystemExit(f"at most {len(variants) * len(base.images)} images can be made")
    imgs, labels = [], []
    for flip, dx, dy in variants[:need]:
        x = base.images[:, :, ::-1] if flip else base.images
        imgs.append(shifted(x, dx, dy))
        labels.append(base.labels)
    FaceArrays(np.ascontiguousarray(np.concatenate(imgs)[:n]), np.concatenate(labels)[:n],
               base.names).save(folder)


def child(args) -> None:
    """A worker's job, as far as memory goes: load the dataset, train, report VmHWM."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from facegrad.data.store import FaceArrays
    from facegrad.pipeline import run_training_job
    from facegrad.training.config import TrainConfig

    folder = Path(args.child)
    data = FaceArrays.load(folder)  # memory-mapped, as facegrad.service.jobs does
    out = {"images": int(len(data.labels)), "import_load_kb": status_kb("self", "VmHWM")}
    if not args.no_train:
        cfg = TrainConfig(architecture=args.arch, epochs=1, device="cpu")
        t0 = time.perf_counter()
        run_training_job(cfg, data, folder / "run", pretrained_dir=pretrained_dir())
        out["train_s"] = time.perf_counter() - t0
    out["hwm_kb"] = status_kb("self", "VmHWM")
    print("RESULT " + json.dumps(out), flush=True)


def run_child(folder: Path, args, train: bool) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), "--arch", args.arch,
           "--threads", str(args.threads)] + ([] if train else ["--no-train"])
    return run_measured(cmd)


def main() -> None:
    ap = device_parser(__doc__.splitlines()[0])
    ap.add_argument("--arch", default="facenet_s")
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--child", help=argparse_hidden())
    ap.add_argument("--no-train", action="store_true", help=argparse_hidden())
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.device != "cpu":
        raise SystemExit("this benchmark measures host memory of a CPU run; no --device cuda")
    setup(args)  # the children get --threads too
    header("worker_memory: peak RSS of a 1-epoch training run")

    base = orl_all()
    tmp = Path(tempfile.mkdtemp(prefix="facegrad-bench-mem-"))
    rows, peaks = [], {}
    try:
        for n in sorted(args.sizes):
            folder = tmp / f"ds-{n}"
            synthesise(base, n, folder)
            mb = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
            if n == min(args.sizes):
                b = run_child(folder, args, train=False)
                rows.append(["baseline: import + load", n, mb, b["hwm_kb"] / 1024, 1.0, None,
                             ""])
                baseline = b["hwm_kb"]
            r = run_child(folder, args, train=True)
            peaks[n] = r["hwm_kb"] / 1024
            last = n == max(args.sizes)
            bar = f"< {BAR_MB:.0f} MB: {verdict(peaks[n] < BAR_MB)}" if last else ""
            rows.append([f"train 1 epoch ({args.arch})", n, mb, peaks[n],
                         r["hwm_kb"] / baseline, r["train_s"], bar])
            print(f"  {n} images: VmHWM {peaks[n]:.0f} MB (sampled VmRSS peak "
                  f"{r['sampled_rss_kb'] / 1024:.0f} MB), trained in {r['train_s']:.0f} s",
                  flush=True)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(table(["run", "images", "dataset MB", "peak RSS MB", "x baseline", "train s",
                 "bar"], rows))
    lo, hi = min(peaks), max(peaks)
    if hi > lo:
        print(f"\ngrowth: {(peaks[hi] - peaks[lo]) / ((hi - lo) / 1000):.1f} MB of peak RSS per "
              f"1k images (stored crops alone are {128 * 128 * 3 * 1000 / 2**20:.1f} MB per 1k)")
    ok = peaks[hi] < BAR_MB
    print(f"bar (peak RSS < {BAR_MB:.0f} MB at {hi} images): {verdict(ok)}")
    footer()


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
