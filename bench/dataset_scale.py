"""Dataset scale: a streaming worker's peak RSS at 10k and 100k images; epoch throughput of
streaming vs the in-memory path at 10k.

    .venv/bin/python bench/dataset_scale.py [--sizes 10000 100000] [--steps 250] [--rounds 2]
                                            [--threads N]

Datasets are synthesised from the 400 ORL faces (stored 150x150 chips, made as dataset building
makes them): copy c of the 400 is mirrored when c is odd, shifted by (dx, dy) of up to 12 px
(edge-replicated; the shift cycles through 25 offsets with c // 2) and scaled in brightness by
0.80-1.20 (a factor cycling with c // 50). Every copy is a new set of 40 people ("c0007-s12"),
so n images hold n / 10 identities of 10 images each, as ORL's. The rows are written straight
into the stored format (images.npy a copy at a time with ``facegrad.data.store.NpyRowWriter``,
labels.npy, names.json) under a temporary data folder, never held in memory whole.

Peak RSS: a fresh subprocess per run does what a worker does for a job:
``FaceArrays.load`` (memory-mapped), then ``facegrad.pipeline.run_training_job`` with seed_cnn, 1
epoch cut to its first ``--steps`` steps (250 of batch 32: 8000 images, about the whole epoch at
10k), data_loading 'stream', device cpu, 5 % of the people held out for calibration
(``calibration_identities`` 0.05, the job default is 0.2), everything else the job defaults (10 % of
each person's images for validation, 64 px) - including the end of the job: the validation pass, the
gallery (every image embedded) and the open-set calibration over all of them. Both sizes do the same
training work: streaming holds a bounded queue of batches, so its memory does not depend on how many
steps run, while everything sized by the dataset (split, labels, gallery, calibration) runs in full.
The held-out share is lower than the default only to keep the run short: calibration's time grows
with probes x gallery (at 0.2 and 100k images, 48k probes against 100k images: 5 minutes on this
CPU), its memory does not (chunks of ``open_set.SCORE_CELLS``). The child reports VmHWM from
/proc/self/status as it ends (the parent also samples its VmRSS every 0.1 s). The same run at the
smaller size with data_loading 'memory' is printed for comparison.

Throughput: in this process, the training split of the 10k dataset (the job's split) as
``DeviceBatches`` ('memory': resized once, held) and as ``StreamBatches`` ('stream': on the
CPU resized once into an unlinked temp file, batches read from it by a background thread);
one ``train_epoch`` of a fresh seed_cnn
(batch 32, augmentation on, the same seed) over each, alternating which goes first each round;
training images per second (after a 10-step warm-up of each), the ratio the median of the
per-round ratios.

Bar: rss_ratio_100k_10k (peak RSS at 100k / at 10k) <= 1.2 and throughput_ratio
(stream / memory) >= 0.95. The last line is ``rss_ratio_100k_10k=X throughput_ratio=Y``.
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
    run_measured,
    setup,
    status_kb,
    table,
    verdict,
)

import numpy as np  # isort: skip
import torch  # isort: skip

RSS_BAR = 1.2
HELD_OUT = 0.05  # calibration_identities of the runs (see above)
THROUGHPUT_BAR = 0.95
SHIFTS = [(dx, dy) for dx in (-12, -6, 0, 6, 12) for dy in (-12, -6, 0, 6, 12)]
BRIGHTNESS = (1.0, 0.8, 1.2, 0.9, 1.1)


def shifted(images: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """(N, S, S, 3) shifted by (dx, dy) pixels, edges replicated."""
    if dx == 0 and dy == 0:
        return images
    p = max(abs(dx), abs(dy))
    padded = np.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), mode="edge")
    s = images.shape[1]
    return padded[:, p - dy:p - dy + s, p - dx:p - dx + s]


def copy_of(base_images: np.ndarray, c: int) -> np.ndarray:
    """Copy ``c`` of the base faces: mirrored (odd c), shifted, brightness-scaled."""
    x = base_images[:, :, ::-1] if c % 2 else base_images
    x = shifted(x, *SHIFTS[(c // 2) % len(SHIFTS)])
    b = BRIGHTNESS[(c // 50) % len(BRIGHTNESS)]
    if b != 1.0:
        x = np.clip(x.astype(np.float32) * b, 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(x)


def synthesise(base, n: int, folder: Path) -> None:
    """``n`` images (a whole number of copies of the base, the last cut short) as a stored
    dataset in ``folder``; each copy's 40 people are new identities."""
    from facegrad.data.store import NpyRowWriter

    folder.mkdir(parents=True)
    k = len(base.images)
    copies = -(-n // k)
    labels, names = [], []
    with NpyRowWriter(folder / "images.npy", base.images.shape[1:]) as w:
        for c in range(copies):
            take = min(k, n - c * k)
            w.append(copy_of(base.images, c)[:take])
            labels.append(base.labels[:take] + c * len(base.names))
            names += [f"c{c:04d}-{name}" for name in base.names]
        w.finish()
    np.save(folder / "labels.npy", np.concatenate(labels).astype(np.int64))
    used = int(np.concatenate(labels).max()) + 1
    (folder / "names.json").write_text(json.dumps(names[:used]))


def child(args) -> None:
    """A worker's job as far as memory goes: load the stored dataset, train, report VmHWM."""
    import itertools

    if args.threads:
        torch.set_num_threads(args.threads)
    from facegrad.data.store import FaceArrays
    from facegrad.pipeline import run_training_job
    from facegrad.training import loop as training
    from facegrad.training.config import TrainConfig

    epoch = training.train_epoch

    def first_steps(cfg, parts, batches, *rest, **kw):  # the epoch's first --steps batches
        return epoch(cfg, parts, itertools.islice(batches, args.steps), *rest, **kw)

    training.train_epoch = first_steps

    folder = Path(args.child)
    data = FaceArrays.load(folder)  # memory-mapped, as facegrad.service.jobs does
    out = {"images": int(len(data.labels)), "identities": len(data.names),
           "import_load_kb": status_kb("self", "VmHWM")}
    cfg = TrainConfig(architecture="seed_cnn", epochs=1, device="cpu",
                      data_loading=args.loading, calibration_identities=HELD_OUT)
    t0 = time.perf_counter()
    result = run_training_job(cfg, data, folder / f"run-{args.loading}")
    out["train_s"] = time.perf_counter() - t0
    out["epoch_s"] = result.history[-1]["epoch_seconds"]
    out["val_acc"] = result.history[-1]["val_acc"]
    out["verify_pairs"] = result.open_set.get("verify_pairs")
    out["hwm_kb"] = status_kb("self", "VmHWM")
    print("RESULT " + json.dumps(out), flush=True)


def run_child(folder: Path, args, loading: str) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), "--loading", loading,
           "--threads", str(args.threads), "--steps", str(args.steps)]
    return run_measured(cmd)


def throughput(folder: Path, rounds: int) -> dict:
    """Training images/s of one epoch over the job's training split, memory vs stream."""
    import itertools

    from facegrad.data.batches import make_batches, stratified_split
    from facegrad.data.preprocess import normaliser
    from facegrad.data.store import FaceArrays
    from facegrad.recognition.architectures import architecture
    from facegrad.recognition.gallery import holdout_identities
    from facegrad.training.config import TrainConfig
    from facegrad.training.loop import (
        Hooks,
        make_step_parts,
        train_epoch,
        without_identities,
    )

    cfg = TrainConfig(architecture="seed_cnn", epochs=1, device="cpu",
                      calibration_identities=HELD_OUT)
    device = torch.device("cpu")
    full = FaceArrays.load(folder)
    data = without_identities(full, holdout_identities(full.labels, cfg.calibration_identities,
                                                       cfg.seed))
    train_idx, _, _ = stratified_split(data.labels, cfg.val_fraction, cfg.seed)
    normalise = normaliser(architecture(cfg.architecture).normalisation)
    sets = {mode: make_batches(data.images, data.labels, train_idx, cfg.image_size, device,
                               normalise, mode) for mode in ("memory", "stream")}
    drop_last = len(train_idx) > cfg.batch_size
    steps = sets["memory"].num_batches(cfg.batch_size, drop_last)
    images = steps * cfg.batch_size if drop_last else len(train_idx)

    def one(mode: str, limit: int | None = None) -> float:
        torch.manual_seed(cfg.seed)
        parts = make_step_parts(cfg, len(data.names), device)
        gen = torch.Generator().manual_seed(cfg.seed)
        t0 = time.perf_counter()
        batches = sets[mode].epoch(cfg.batch_size, gen, cfg.augment, drop_last)
        train_epoch(cfg, parts, itertools.islice(batches, limit), 0, 0, steps, Hooks(),
                    {"last_report": 0.0})
        return time.perf_counter() - t0

    for mode in sets:  # warm-up: first-call allocations, thread pools
        one(mode, 10)
    times = {"memory": [], "stream": []}
    for r in range(rounds):
        for mode in (("memory", "stream") if r % 2 == 0 else ("stream", "memory")):
            times[mode].append(one(mode))
            print(f"  round {r + 1} {mode}: {images / times[mode][-1]:.0f} images/s",
                  flush=True)
    ratio = float(np.median([m / s for m, s in zip(times["memory"], times["stream"])]))
    return {"images": images, "times": times, "ratio": ratio}


def main() -> None:
    ap = device_parser(__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs=2, default=[10000, 100000])
    ap.add_argument("--rounds", type=int, default=2, help="throughput epochs of each loading")
    ap.add_argument("--steps", type=int, default=250, help="training steps of each RSS run")
    ap.add_argument("--keep", help="write the datasets here and keep them (default: a temp dir)")
    ap.add_argument("--child", help=argparse_hidden())
    ap.add_argument("--loading", default="stream", help=argparse_hidden())
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.device != "cpu":
        raise SystemExit("this benchmark measures host memory of a CPU worker; no --device cuda")
    setup(args)
    header("dataset_scale: streaming datasets, peak worker RSS and epoch throughput")
    small, large = sorted(args.sizes)

    base = orl_all()
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="facegrad-bench-scale-"))
    rows, peaks = [], {}
    try:
        folders = {}
        for n in (small, large):
            folders[n] = tmp / "datasets" / f"synth-{n}"
            t0 = time.perf_counter()
            synthesise(base, n, folders[n])
            mb = (folders[n] / "images.npy").stat().st_size / 2**20
            print(f"  synthesised {n} images ({mb:.0f} MB) in {time.perf_counter() - t0:.0f} s",
                  flush=True)

        print("throughput at", small, "images:", flush=True)
        tp = throughput(folders[small], args.rounds)

        for n, loading in ((small, "memory"), (small, "stream"), (large, "stream")):
            r = run_child(folders[n], args, loading)
            mb = r["hwm_kb"] / 1024
            if loading == "stream":
                peaks[n] = mb
            rows.append([n, r["identities"], loading, mb, r["sampled_rss_kb"] / 1024,
                         r["epoch_s"], r["train_s"], r["verify_pairs"]])
            print(f"  {n} images, {loading}: VmHWM {mb:.0f} MB, job {r['train_s']:.0f} s",
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(table(["images", "identities", "data_loading", "peak RSS MB (VmHWM)",
                 "sampled VmRSS MB", f"{args.steps} steps + val s", "job s", "verify pairs"],
                rows))
    med = {m: float(np.median(tp["times"][m])) for m in ("memory", "stream")}
    print()
    print(table(["data_loading", "training images/s (median)", "epoch s (median)"],
                [[m, tp["images"] / med[m], med[m]] for m in ("memory", "stream")]))
    rss_ratio = peaks[large] / peaks[small]
    ok_rss, ok_tp = rss_ratio <= RSS_BAR, tp["ratio"] >= THROUGHPUT_BAR
    print(f"\npeak RSS {large} / {small} images (stream): {rss_ratio:.3f} "
          f"(bar <= {RSS_BAR}): {verdict(ok_rss)}")
    print(f"epoch throughput stream / memory at {small} images: {tp['ratio']:.3f} "
          f"(bar >= {THROUGHPUT_BAR}): {verdict(ok_tp)}")
    footer()
    print(f"rss_ratio_100k_10k={rss_ratio:.3f} throughput_ratio={tp['ratio']:.3f}")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
