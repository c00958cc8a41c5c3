"""Data pipeline: a training epoch's wall time vs the pure compute time of the same steps.

    .venv/bin/python bench/data_pipeline.py [--device cuda] [--threads N] [--rounds 5]

The 400 ORL faces in a ``DeviceBatches`` (uint8, resized once, on the device), default
training config (batch 32, 64x64, norm clipping) with augmentation on:

- epoch: ``facegrad.training.loop.train_epoch`` over ``DeviceBatches.epoch(..., augment=True)``:
  index, augment (batched random affine, gamma, contrast, greyscale), standardise, step.
- compute: the same ``train_epoch`` over the very same batches, assembled beforehand (same
  generator seed, so the same order and augmentation draws): steps only.

Two estimates of the compute share of the epoch: in the epoch itself, (wall - time spent in the
batch iterator) / wall, which no drift between passes can skew (judged on the CPU); and across
passes, compute pass / epoch, the median over rounds of alternating pairs (judged on CUDA, where
the iterator only launches kernels). Bar: compute share >= 0.90.
"""

from __future__ import annotations

import time

from _common import (
    device_parser,
    footer,
    header,
    median,
    orl_all,
    setup,
    sync,
    table,
    verdict,
)

import torch  # isort: skip

BAR = 0.90
BATCH = 32


class TimedIter:
    """Wraps a batch iterator and adds up the time spent producing batches."""

    def __init__(self, it, device):
        self.it, self.device, self.seconds = iter(it), device, 0.0

    def __iter__(self):
        return self

    def __next__(self):
        t0 = time.perf_counter()
        try:
            return next(self.it)
        finally:
            sync(self.device)
            self.seconds += time.perf_counter() - t0


def main() -> None:
    ap = device_parser(__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--arch", nargs="+", default=["facenet_s", "seed_cnn"])
    args = ap.parse_args()
    device = setup(args)
    header("data_pipeline: epoch wall time vs pure compute of the same steps", device)

    from facegrad.data.batches import DeviceBatches
    from facegrad.training.config import TrainConfig
    from facegrad.training.loop import Hooks, make_step_parts, train_epoch

    data = orl_all()
    src = DeviceBatches(data.images, data.labels, 64, device)
    steps = src.num_batches(BATCH, True)
    print(f"{len(src)} images, {steps} steps of {BATCH} per epoch, augmentation on, "
          f"{args.rounds} rounds + 1 warm-up")

    rows, ok_all = [], True
    for arch in args.arch:
        cfg = TrainConfig(architecture=arch, batch_size=BATCH, device=device.type)
        torch.manual_seed(0)
        parts = make_step_parts(cfg, len(data.names), device)
        hooks, progress = Hooks(), {"last_report": 0.0}
        seed = {"n": 0}

        def epoch_batches(materialise: bool, seed=seed):
            gen = torch.Generator().manual_seed(seed["n"])
            it = src.epoch(BATCH, gen, augment=True, drop_last=True)
            return list(it) if materialise else it

        def timed(batches, cfg=cfg, parts=parts, hooks=hooks, progress=progress):
            sync(device)
            t0 = time.perf_counter()
            _, loss_sum, _, _ = train_epoch(cfg, parts, batches, 0, 0, steps, hooks, progress)
            float(loss_sum)
            sync(device)
            return time.perf_counter() - t0

        def run_epoch():
            """(wall, data): the epoch's wall time and the time spent in its batch iterator."""
            it = TimedIter(epoch_batches(False), device)
            wall = timed(it)
            return wall, it.seconds

        def run_compute():
            return timed(epoch_batches(True))  # assembled before the clock starts

        for fn in (run_epoch, run_compute):  # warm-up
            fn()
        # alternate, rotating order; both passes of a round share one seed (the same order and
        # augmentation draws), each round a new one
        walls, datas, computes = [], [], []
        for r in range(args.rounds):
            seed["n"] = r + 1
            if r % 2:
                computes.append(run_compute())
                wall, data_s = run_epoch()
            else:
                wall, data_s = run_epoch()
                computes.append(run_compute())
            walls.append(wall)
            datas.append(data_s)
        in_epoch = median([(w - d) / w for w, d in zip(walls, datas)])
        separate = median([c / w for c, w in zip(computes, walls)])
        share = separate if device.type == "cuda" else in_epoch
        ok = share >= BAR
        ok_all &= ok
        ep, da, co = median(walls), median(datas), median(computes)
        rows.append([arch, ep * 1000, da * 1000, co * 1000, steps * BATCH / ep, in_epoch,
                     separate, f">= {BAR}: {verdict(ok)}"])
    print()
    print(table(["arch", "epoch ms", "data ms", "compute-pass ms", "epoch img/s",
                 "share (in epoch)", "share (passes)", "bar"], rows))
    print("\nepoch: wall time of train_epoch over DeviceBatches.epoch(augment=True); data: time "
          "spent inside its batch iterator (index, augment, standardise); compute pass: the same "
          "batches assembled beforehand.\nshare (in epoch) = (epoch - data) / epoch, both from "
          "the same pass: immune to drift between passes, judged on the CPU. share (passes) = "
          "compute pass / epoch, median of paired rounds: judged on CUDA, where kernels run "
          "asynchronously and the iterator's time is only their launch.")
    print(f"\nbar (compute >= {BAR} of the epoch): {verdict(ok_all)}")
    footer()


if __name__ == "__main__":
    main()
