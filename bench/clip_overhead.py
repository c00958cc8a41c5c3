"""Clipping overhead: the service's training step time per clip mode, relative to mode none.

    .venv/bin/python bench/clip_overhead.py [--device cuda] [--threads N] [--rounds 9]

For facenet_s and seed_cnn (batch 32, 64x64, ORL faces, AdamW), one model and optimizer shared by
every clip mode (only the clipper and its telemetry differ), stepped with
``facegrad.training.loop.train_step`` on the same batches, every timed run starting from the same
weights and optimizer state. Within a round every mode runs
``--steps`` steps (rotating order); ``x none`` is the median over rounds of the mode's time over
mode none's time in the same round. ``clip-only`` is a second, less noisy estimate of the same
ratio: ``1 + (clipper call - none's clipper call) / none's step``, from timing the clipper and
its telemetry update alone on the mode's real gradients (interleaved too).

Bars: norm (both scopes) and value <= 1.05x; threshold, agc, autoclip <= 1.15x; judged on
``x none``.
"""

from __future__ import annotations

import dataclasses
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

BATCH = 32
MODES = {
    "none": ({"mode": "none"}, None),
    "value 1.0": ({"mode": "value", "clip_value": 1.0}, 1.05),
    "norm 5 global": ({"mode": "norm", "max_norm": 5.0, "scope": "global"}, 1.05),
    "norm 5 per_tensor": ({"mode": "norm", "max_norm": 5.0, "scope": "per_tensor"}, 1.05),
    "threshold 0.9": ({"mode": "threshold", "alpha": 0.9}, 1.15),
    "agc 0.01": ({"mode": "agc", "clip_factor": 0.01}, 1.15),
    "autoclip p10": ({"mode": "autoclip", "percentile": 10.0}, 1.15),
}


def main() -> None:
    ap = device_parser(__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--steps", type=int, default=4, help="steps per mode per round")
    ap.add_argument("--arch", nargs="+", default=["facenet_s", "seed_cnn"])
    args = ap.parse_args()
    device = setup(args)
    header("clip_overhead: training step time per clip mode vs none", device)

    from facegrad.clipping import build_clipper
    from facegrad.clipping.telemetry import ClipTelemetry
    from facegrad.data.batches import DeviceBatches
    from facegrad.training.config import TrainConfig
    from facegrad.training.loop import make_step_parts, train_step

    data = orl_all()
    src = DeviceBatches(data.images, data.labels, 64, device)
    gen = torch.Generator().manual_seed(0)
    batches = list(src.epoch(BATCH, gen, augment=False))[: args.steps]
    print(f"{args.steps} steps of {BATCH} per mode per round, {args.rounds} rounds + 1 warm-up; "
          f"clip-only: 20 clipper calls per mode per round")

    rows, ok_all = [], True
    for arch in args.arch:
        # one model and optimizer for every mode, so that only the clipper (and its telemetry)
        # differs: with a model per mode, each copy's own memory placement and drifting weights
        # moved the step time by up to 20 % on an AVX2 CPU, many times the clipper's own cost;
        # every timed run starts from the same weights and optimizer state
        torch.manual_seed(0)
        base_cfg = TrainConfig(architecture=arch, batch_size=BATCH, device=device.type,
                               lr_schedule="constant")
        shared = make_step_parts(base_cfg, len(data.names), device)
        shared.model.train()
        parts = {name: dataclasses.replace(shared, clipper=build_clipper(
                     TrainConfig(clip=clip).clip, shared.model), telemetry=ClipTelemetry())
                 for name, (clip, _) in MODES.items()}
        # one untimed step first, so that the optimizer's state exists; each timed run then
        # copies the snapshot back in place (no allocation inside the runs)
        train_step(shared, batches[0][0], batches[0][1], 3e-3)
        live = [*shared.model.state_dict().values()]
        live += [v for st in shared.opt.state.values() for v in st.values() if torch.is_tensor(v)]
        snapshot = [t.detach().clone() for t in live]

        def stepper(p, live=live, snapshot=snapshot):
            def run():
                with torch.no_grad():
                    for t, s in zip(live, snapshot):
                        t.copy_(s)
                sync(device)
                t0 = time.perf_counter()
                for xb, yb in batches:
                    train_step(p, xb, yb, 3e-3)
                sync(device)
                return time.perf_counter() - t0
            return run

        def clip_only(p):
            def run():
                sync(device)
                t0 = time.perf_counter()
                for _ in range(20):
                    r = p.clipper(p.params)
                    p.telemetry.update(r)
                    bool(r.finite)  # train_step's host check
                sync(device)
                return (time.perf_counter() - t0) / 20
            return run

        steps = {n: stepper(p) for n, p in parts.items()}
        for fn in steps.values():
            fn()
        res = interleave(steps, args.rounds, baseline="none")
        clips = interleave({n: clip_only(p) for n, p in parts.items()}, args.rounds,
                           baseline="none")
        none_step = res["none"]["median"] / len(batches)
        n_params = sum(p.numel() for p in parts["none"].params)
        for name, (_, bar) in MODES.items():
            step_ms = res[name]["median"] / len(batches) * 1000
            clip_ms = clips[name]["median"] * 1000
            est = 1 + (clips[name]["median"] - clips["none"]["median"]) / none_step
            if bar is None:
                rows.append([arch, name, step_ms, clip_ms, 1.0, 1.0, "baseline"])
                continue
            ok = res[name]["ratio"] <= bar
            ok_all &= ok
            rows.append([arch, name, step_ms, clip_ms, res[name]["ratio"], est,
                         f"<= {bar}: {verdict(ok)}"])
        print(f"{arch}: {n_params:,} parameters in {len(parts['none'].params)} tensors; "
              f"median none step {none_step * 1000:.1f} ms")
    print()
    print(table(["arch", "mode", "ms/step", "clipper ms", "x none", "clip-only x", "bar"], rows))
    print(f"\nall bars: {verdict(ok_all)}  (clipper ms: one clipper call + telemetry update; "
          "mode none's call still computes the per-tensor L2 norms for telemetry)")
    footer()


if __name__ == "__main__":
    main()
