"""One job over 1, 2, ... devices (DistributedDataParallel): training throughput and its scaling.

Weak scaling, as data-parallel training is used: every process takes ``--per-device-batch``
rows of each step, so a world of W trains a global batch W times as large. Each world size trains
the same synthetic dataset (``--images`` faces: copies of the ORL faces, mirrored, shifted and
brightness-scaled, each copy's people new identities, as bench/dataset_scale.py makes them) for
2 epochs through ``facegrad.pipeline.run_training_job``; the figure is the second epoch's training
images per second (the first includes start-up). Baseline: the same job on one process, in the same
run. On the CPU (gloo) the processes share the machine's cores, so this measures the cost of the
process group, not a speed-up; on a machine with W GPUs it measures the scaling.

    python bench/ddp_scaling.py                         # CPU: 1 and 2 gloo processes
    python bench/ddp_scaling.py --device cuda           # 1, 2, 4, ... up to every GPU

Ends with ``scaling world=W speedup=X efficiency=Y`` for the largest world.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import device_parser, footer, header, orl_all, pretrained_dir, setup, table
from dataset_scale import synthesise

import torch  # isort: skip


def run(folder: Path, work: Path, device: torch.device, world: int, args) -> dict:
    from facegrad.data.store import FaceArrays
    from facegrad.pipeline import run_training_job
    from facegrad.training.config import TrainConfig

    arch = args.arch or ("dlib_resnet" if device.type == "cuda" else "seed_cnn")
    cfg = TrainConfig(architecture=arch, epochs=2, device=device.type, devices=world,
                      batch_size=args.per_device_batch * world, data_loading="memory",
                      calibration_identities=0, val_fraction=0.05)
    data = FaceArrays.load(folder)
    t0 = time.perf_counter()
    result = run_training_job(cfg, data, work / f"run-{world}-{time.monotonic_ns()}",
                              pretrained_dir=pretrained_dir(), dataset_dir=folder)
    last = result.history[-1]
    rows = last["step"] // 2 * cfg.batch_size  # steps of the second epoch x the global batch
    return {"world": world, "arch": arch, "global_batch": cfg.batch_size,
            "epoch_s": last["epoch_seconds"], "images_per_s": rows / last["epoch_seconds"],
            "job_s": time.perf_counter() - t0, "train_loss": last["train_loss"]}


def main() -> None:
    p = device_parser(__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000, help="synthetic dataset size")
    p.add_argument("--per-device-batch", type=int, default=32)
    p.add_argument("--arch", choices=("seed_cnn", "facenet_s", "dlib_resnet"), default=None,
                   help="default: dlib_resnet on CUDA, seed_cnn on the CPU")
    p.add_argument("--worlds", type=str, default="",
                   help="comma-separated process counts (default: 1, 2, 4, ... up to every GPU; "
                   "1,2 on the CPU)")
    args = p.parse_args()
    device = setup(args)
    header("one job over several devices (DistributedDataParallel)", device)
    if args.worlds:
        worlds = [int(w) for w in args.worlds.split(",")]
    elif device.type == "cuda":
        n = torch.cuda.device_count()
        worlds = sorted({1, n} | {w for w in (2, 4, 8, 16) if w <= n})
    else:
        worlds = [1, 2]
    with tempfile.TemporaryDirectory(prefix="ddp-scaling-") as tmp:
        folder = Path(tmp) / "data"
        synthesise(orl_all(), args.images, folder)
        print(f"dataset: {args.images} synthetic faces (ORL copies), {args.per_device_batch} rows "
              f"per process per step; worlds {worlds}")
        results = [run(folder, Path(tmp), device, w, args) for w in worlds]
    base = results[0]["images_per_s"]
    print(table(["processes", "arch", "global batch", "epoch s", "images/s", "speed-up",
           "efficiency", "train loss"],
          [[r["world"], r["arch"], r["global_batch"], f"{r['epoch_s']:.2f}",
            f"{r['images_per_s']:.0f}", f"{r['images_per_s'] / base:.2f}x",
            f"{r['images_per_s'] / base / r['world']:.2f}", f"{r['train_loss']:.3f}"]
           for r in results]))
    footer()
    top = results[-1]
    speedup = top["images_per_s"] / base
    print(f"scaling world={top['world']} speedup={speedup:.2f} "
          f"efficiency={speedup / top['world']:.2f}")


if __name__ == "__main__":
    main()
