"""Training throughput: the service's training step vs a bare PyTorch loop (clip mode none).

    .venv/bin/python bench/train_throughput.py [--device cuda] [--threads N] [--steps 80]

Rows per architecture, batch 32, the 400 ORL faces: seed_cnn and facenet_s at 64x64,
dlib_resnet (the pretrained network fine-tuned by the default job, its first two stages frozen)
at 150x150 with a quarter of the steps:

- bare: a plain forward / cross-entropy / backward / step of the same model and optimizer
  (the architecture's default) over float batches already normalised in memory (no clipping,
  telemetry or LR schedule).
- service step: ``facegrad.training.loop.train_step`` (what ``train`` runs per batch: LR set,
  autocast, unscale, clipper, telemetry, finiteness check, optimizer step) on the same batches.
- service loop: ``facegrad.training.loop.train_epoch`` over a one-batch slice of
  ``DeviceBatches.epoch`` with augmentation off: the inner loop of ``train`` including batch
  assembly and running metrics (augmentation is bench/data_pipeline.py's subject).

All three step one shared model and optimizer, one step of each in turn (rotating order), each
step timed on its own; the ratio is the bare loop's median step time over the variant's. Single
steps taken in turn see the same machine: on this project's 2-core VMs a step's time flips
between two speeds every few seconds, and runs of a dozen steps per variant, compared round by
round, missed or met the bar by chance. Bar: ratio >= 0.95.
"""

from __future__ import annotations

import itertools
import statistics
import time

from _common import (
    device_parser,
    footer,
    header,
    orl_all,
    pretrained_dir,
    setup,
    sync,
    table,
    verdict,
)

import torch  # isort: skip
import torch.nn.functional as F  # isort: skip

BAR = 0.95
BATCH = 32


def bare_step(model: torch.nn.Module, opt: torch.optim.Optimizer, device: torch.device,
              amp_dtype):
    """A plain training step on ``model`` and ``opt``: forward, cross-entropy, backward, step."""
    from facegrad.recognition.models import FaceNetS, PretrainedFace

    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    # their training forward takes the target (CosFace margin)
    margin = isinstance(model, (FaceNetS, PretrainedFace))

    def step(xb, yb):
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            _, logits = model(xb, yb) if margin else model(xb)
            loss = F.cross_entropy(logits.float(), yb)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def main() -> None:
    ap = device_parser(__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80, help="timed steps per variant")
    args = ap.parse_args()
    device = setup(args)
    header("train_throughput: service training step vs bare PyTorch loop", device)

    from facegrad.data.batches import DeviceBatches
    from facegrad.data.preprocess import normaliser
    from facegrad.recognition.architectures import architecture
    from facegrad.training.config import TrainConfig
    from facegrad.training.loop import (
        Hooks,
        make_step_parts,
        train_epoch,
        train_step,
    )

    data = orl_all()
    print(f"{len(data.names)} identities, {len(data.labels)} images, batch {BATCH}; "
          f"{args.steps} timed steps per variant ({args.steps // 4} for dlib_resnet), one step "
          "of each variant in turn (rotating order), after 3 warm-up turns")

    rows, ok_all = [], True
    for arch in ("seed_cnn", "facenet_s", "dlib_resnet"):
        cfg = TrainConfig(architecture=arch, clip={"mode": "none"}, batch_size=BATCH,
                          device=device.type, lr_schedule="constant")
        batches_src = DeviceBatches(data.images, data.labels, cfg.image_size, device,
                                    normalise=normaliser(architecture(arch).normalisation))
        gen = torch.Generator().manual_seed(0)
        batches = [(x.contiguous(memory_format=torch.channels_last)
                    if device.type == "cuda" else x, y)
                   for x, y in batches_src.epoch(BATCH, gen, augment=False)]
        steps = args.steps // 4 if arch == "dlib_resnet" else args.steps
        # the three variants step one model and optimizer: copies of their own would sit in
        # different memory and drift apart, which moved step times by more than the service's
        # own cost on an AVX2 CPU
        torch.manual_seed(0)
        parts = make_step_parts(cfg, len(data.names), device,
                                pretrained_dir=pretrained_dir())
        parts.model.train()
        bare = bare_step(parts.model, parts.opt, device, parts.amp_dtype)
        hooks, progress = Hooks(), {"last_report": 0.0}
        loop_gen = torch.Generator().manual_seed(1)

        def run_loop(i, parts=parts, cfg=cfg, loop_gen=loop_gen, hooks=hooks,
                     progress=progress, batches_src=batches_src):
            # train_epoch over a one-batch slice of a DeviceBatches epoch: batch assembly,
            # the step and the running metrics, as train() runs them
            it = itertools.islice(batches_src.epoch(BATCH, loop_gen, augment=False), 1)
            _, loss_sum, _, seen = train_epoch(cfg, parts, it, 0, i, 10 ** 6, hooks, progress)
            float(loss_sum)  # the epoch's one host sync, as train() does after the loop
            assert seen == BATCH

        variants = {
            "bare": lambda i, bare=bare, batches=batches: bare(*batches[i % len(batches)]),
            "service step": lambda i, parts=parts, cfg=cfg, batches=batches: train_step(
                parts, *batches[i % len(batches)], cfg.learning_rate),
            "service loop": run_loop,
        }
        times = {n: [] for n in variants}
        names = list(variants)
        for turn in range(steps + 3):
            k = turn % len(names)
            for n in names[k:] + names[:k]:
                sync(device)
                t0 = time.perf_counter()
                variants[n](turn)
                sync(device)
                if turn >= 3:
                    times[n].append(time.perf_counter() - t0)
        base = statistics.median(times["bare"])
        for name in names:
            med = statistics.median(times[name])
            ratio = base / med  # throughput ratio = bare step time / service step time
            if name == "bare":
                rows.append([arch, name, BATCH / med, med * 1000, 1.0, "baseline"])
            else:
                ok = ratio >= BAR
                ok_all &= ok
                rows.append([arch, name, BATCH / med, med * 1000, ratio,
                             f">= {BAR}: {verdict(ok)}"])
    print()
    print(table(["arch", "variant", "images/s", "ms/step", "x bare", "bar"], rows))
    print("\nms/step: median of the variant's timed steps; x bare: the bare loop's median step "
          "time over the variant's")
    print(f"bar (service >= {BAR}x bare images/s, every row): {verdict(ok_all)}")
    footer()


if __name__ == "__main__":
    main()
