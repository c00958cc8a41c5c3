"""Training throughput: the service's training step vs a bare PyTorch loop (clip mode none).

    .venv/bin/python bench/train_throughput.py [--device cuda] [--threads N] [--rounds 15]

Rows per architecture (seed_cnn, facenet_s), batch 32, 64x64, the 400 ORL faces:

- bare: a plain forward / cross-entropy / backward / step of the same model and AdamW
  optimizer over float batches already standardised in memory (no clipping, telemetry or LR
  schedule).
- service step: ``facegrad.training.train_step`` (what ``train`` runs per batch: LR set,
  autocast, unscale, clipper, telemetry, finiteness check, optimizer step) on the same batches.
- service loop: ``facegrad.training.train_epoch`` over ``DeviceBatches.epoch`` with
  augmentation off: the inner loop of ``train`` including batch assembly and running metrics
  (augmentation is bench/data_pipeline.py's subject).

All three step one shared model and optimizer, restored to the same state before every timed
run. Bare and service rows alternate within each round (rotating order); the ratio is the
median over rounds of service images/s over bare images/s in the same round. Bar: ratio >= 0.95.
"""

from __future__ import annotations

import time

from _common import (
    device_parser,
    footer,
    header,
    interleave,
    orl_all,
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
    from facegrad.models import FaceNetS

    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    margin = isinstance(model, FaceNetS)  # its training forward takes the target (CosFace)

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
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    device = setup(args)
    header("train_throughput: service training step vs bare PyTorch loop", device)

    from facegrad.config import TrainConfig
    from facegrad.data import DeviceBatches
    from facegrad.training import Hooks, make_step_parts, train_epoch, train_step

    data = orl_all()
    batches_src = DeviceBatches(data.images, data.labels, 64, device)
    steps = batches_src.num_batches(BATCH, True)
    gen = torch.Generator().manual_seed(0)
    batches = [(x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x, y)
               for x, y in batches_src.epoch(BATCH, gen, augment=False)]
    n_img = sum(y.numel() for _, y in batches)
    print(f"{len(data.names)} identities, {len(batches_src)} images, {steps} steps of {BATCH} "
          f"per timed repetition, {args.rounds} rounds + 1 warm-up")

    rows, ok_all = [], True
    for arch in ("seed_cnn", "facenet_s"):
        cfg = TrainConfig(architecture=arch, clip={"mode": "none"}, batch_size=BATCH,
                          device=device.type, lr_schedule="constant")
        # bare and service step the same model and optimizer (their own copies would sit in
        # different memory and drift apart, which moved step times by more than the service's
        # own cost on an AVX2 CPU); every timed run starts from the same state, copied back in
        # place
        torch.manual_seed(0)
        parts = make_step_parts(cfg, len(data.names), device)
        parts.model.train()
        bare = bare_step(parts.model, parts.opt, device, parts.amp_dtype)
        hooks, progress = Hooks(), {"last_report": 0.0}
        loop_gen = torch.Generator().manual_seed(1)
        bare(*batches[0])  # the optimizer's state exists from here on
        live = [*parts.model.state_dict().values()]
        live += [v for st in parts.opt.state.values() for v in st.values() if torch.is_tensor(v)]
        snapshot = [t.detach().clone() for t in live]

        def restore(live=live, snapshot=snapshot):
            with torch.no_grad():
                for t, saved in zip(live, snapshot):
                    t.copy_(saved)

        def run_bare(bare=bare, restore=restore):
            restore()
            sync(device)
            t0 = time.perf_counter()
            for xb, yb in batches:
                bare(xb, yb)
            sync(device)
            return time.perf_counter() - t0

        def run_step(parts=parts, cfg=cfg, restore=restore):
            restore()
            sync(device)
            t0 = time.perf_counter()
            for xb, yb in batches:
                train_step(parts, xb, yb, cfg.learning_rate)
            sync(device)
            return time.perf_counter() - t0

        def run_loop(parts=parts, cfg=cfg, loop_gen=loop_gen, hooks=hooks,
                     progress=progress, restore=restore):
            restore()
            sync(device)
            t0 = time.perf_counter()
            it = batches_src.epoch(BATCH, loop_gen, augment=False, drop_last=True)
            _, loss_sum, _, seen = train_epoch(cfg, parts, it, 0, 0, steps, hooks, progress)
            float(loss_sum)  # the epoch's one host sync, as train() does after the loop
            sync(device)
            assert seen == n_img
            return time.perf_counter() - t0

        variants = {"bare": run_bare, "service step": run_step, "service loop": run_loop}
        for fn in variants.values():  # warm-up: allocator, oneDNN primitives
            fn()
        res = interleave(variants, args.rounds, baseline="bare")
        for name, r in res.items():
            ips = n_img / r["median"]
            ratio = 1.0 / r["ratio"]  # throughput ratio = bare time / service time
            if name == "bare":
                rows.append([arch, name, ips, r["median"] / steps * 1000, 1.0, "baseline"])
            else:
                ok = ratio >= BAR
                ok_all &= ok
                rows.append([arch, name, ips, r["median"] / steps * 1000, ratio,
                             f">= {BAR}: {verdict(ok)}"])
    print()
    print(table(["arch", "variant", "images/s", "ms/step", "x bare", "bar"], rows))
    print("\nimages/s and ms/step: medians of each variant's own rounds; x bare: median over "
          "rounds of the bare/service time ratio within a round (the judged figure; the two "
          "can disagree by the run-to-run noise)")
    print(f"bar (service >= {BAR}x bare images/s, every row): {verdict(ok_all)}")
    footer()


if __name__ == "__main__":
    main()
