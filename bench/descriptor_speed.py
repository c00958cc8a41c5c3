"""Per-face descriptor time: facegrad's port of dlib's face network against dlib's own.

    .venv/bin/python bench/descriptor_speed.py [--device cuda] [--threads N] [--rounds 5]

The same 32 aligned 150x150 chips (ORL faces through
``facegrad.recognition.detect.crop_one``) are described by:

- dlib: ``dlib.face_recognition_model_v1(...).compute_face_descriptor`` one chip per call, and
  the 32 chips in one call (its batch form);
- facegrad: the network as identify runs it
  (``facegrad.recognition.inference._compiled_embedding``: traced and frozen), at batch 1, 8
  and 32, on the CPU or ``--device cuda``;
- the job's descriptors as the gallery computes them (``facegrad.recognition.gallery.embed``):
  ``flip_mean`` (the chip and its mirror) and ``fused`` (that, and SFace's flip mean,
  :mod:`facegrad.recognition.sface`).

Reported: milliseconds per face (median over rounds, rounds interleaved) and the ratio to dlib
one chip per call. No bar: the figure is recorded in docs/benchmarks.md beside dlib's.
"""

from __future__ import annotations

import statistics
import time

from _common import device_parser, footer, header, pretrained_dir, setup, sync, table

import numpy as np  # isort: skip
import torch  # isort: skip


def main() -> None:
    ap = device_parser(__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    device = setup(args)
    header("descriptor_speed: facegrad's dlib_resnet vs dlib's compute_face_descriptor", device)

    import dlib

    from facegrad.data.imageio import decode_image
    from facegrad.data.preprocess import to_unit
    from facegrad.recognition.detect import crop_one
    from facegrad.recognition.dlib_resnet import dlib_model_path
    from facegrad.recognition.gallery import embed as gallery_embed
    from facegrad.recognition.inference import _compiled_embedding
    from facegrad.recognition.models import PretrainedFace
    from facegrad.training.loop import pretrained_state
    from testkit.harness import orl_folder

    folder = orl_folder()
    paths = [folder[n][0] for n in sorted(folder)[:32]]
    chips = np.stack([crop_one(decode_image(p.read_bytes(), filename=p.name)) for p in paths])
    facerec = dlib.face_recognition_model_v1(str(dlib_model_path()))
    net = PretrainedFace(2)
    net.backbone.load_state_dict(pretrained_state(pretrained_dir()))
    net = net.to(device).eval()
    embed = _compiled_embedding(net, 150, device)
    x = to_unit(torch.from_numpy(chips).permute(0, 3, 1, 2).contiguous()).to(device)
    chip_list = [np.ascontiguousarray(c) for c in chips]

    def ours(batch):
        def run():
            with torch.inference_mode():
                for i in range(0, len(x), batch):
                    embed(x[i:i + batch])
            sync(device)
        return run

    variants = {
        "dlib, 1 chip per call": lambda: [facerec.compute_face_descriptor(c) for c in chip_list],
        "dlib, 32 chips per call": lambda: facerec.compute_face_descriptor(chip_list),
        "facegrad, batch 1": ours(1),
        "facegrad, batch 8": ours(8),
        "facegrad, batch 32": ours(32),
        "gallery, flip_mean": lambda: gallery_embed(net, chips, 150, device,
                                                    normalisation="rgb_unit",
                                                    descriptor="flip_mean"),
        "gallery, fused (+ SFace)": lambda: gallery_embed(net, chips, 150, device,
                                                          normalisation="rgb_unit",
                                                          descriptor="fused"),
    }
    for run in variants.values():  # warm-up
        run()
    times = {n: [] for n in variants}
    names = list(variants)
    for r in range(args.rounds):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            variants[n]()
            times[n].append((time.perf_counter() - t0) / len(chips))
    base = statistics.median(times[names[0]])
    rows = [[n, statistics.median(t) * 1000, base / statistics.median(t)]
            for n, t in times.items()]
    print(table(["variant", "ms per face", "x dlib 1 chip/call"], rows))
    ours32 = statistics.median(times["facegrad, batch 32"]) * 1000
    fused = (statistics.median(times["gallery, fused (+ SFace)"])
             / statistics.median(times["gallery, flip_mean"]))
    print(f"\ndescriptor_speed: facegrad_b32_ms={ours32:.1f} dlib_ms={base * 1000:.1f} "
          f"fused_over_flip_mean={fused:.2f} device={device.type}")
    footer()


if __name__ == "__main__":
    main()
