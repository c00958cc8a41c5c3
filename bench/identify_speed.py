"""Identify's per-photo work on the CPU, this code against the detector and descriptor of an
earlier commit, in the same run: detect → align → describe on 640×480 photos with one face.

    .venv/bin/python bench/identify_speed.py [--base 6defaf2] [--photos 40] [--rounds 5]

- new: ``facegrad.recognition.detect.crop_faces`` (HOG on the colour image, dlib's CNN, run in
  PyTorch, where HOG finds nothing) and the model's descriptor (``flip_mean``: the chip and its
  mirror in one batch), as identify runs them;
- base: ``facegrad/recognition/detect.py`` as it was at ``--base`` (read with ``git show`` and
  loaded as a module: HOG on the grey image, no CNN stage) and the plain embedding;
- new, fused: the same detection with the ``fused`` descriptor (dlib's network and SFace, each
  on the chip and its mirror), which a job with descriptor 'auto' takes where it tells its
  held-out people apart better (turned faces); on frontal photos like these it keeps flip_mean,
  so the bar is flip_mean's ratio and fused's is recorded beside it.

The photos are ORL faces (frames 100-160 px high, upright) pasted on blurred-noise 640×480
pictures (bench/detection.py's); the ratio is theirs. Pictures with no face, where the new code
runs every detection stage (the CNN too), are timed apart (``--photos // 4`` of them). The two
sides alternate set by set, ``--rounds`` times; images/s is the photos over the median of the
rounds' times. One torch thread (dlib's detectors run on one).

Last line: ``identify_speed: ratio=R new_ms=A base_ms=B fused_ratio=F fused_ms=C`` (R: new
images/s over base's).
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import ROOT, footer, header, median

import numpy as np  # isort: skip
import torch  # isort: skip
from detection import backdrop, orl  # isort: skip

from testkit.scenes import paste  # isort: skip


def old_detect(rev: str):
    """facegrad.recognition.detect as it was at ``rev``, as a module of its own."""
    src = subprocess.run(["git", "show", f"{rev}:facegrad/recognition/detect.py"], cwd=ROOT,
                         capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "detect_base.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("detect_base", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["detect_base"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="6defaf2")
    ap.add_argument("--photos", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    header("identify_speed: detect + align + describe per 640x480 photo, this code vs base")
    from facegrad.recognition import detect
    from facegrad.recognition.dlib_resnet import load_pretrained
    from facegrad.recognition.gallery import embed
    from facegrad.recognition.sface import network

    network()  # SFace read once, outside the timings
    base = old_detect(args.base)
    net = load_pretrained(Path(tempfile.mkdtemp()))
    rng = np.random.default_rng(0)
    photos = []
    for k in range(args.photos):
        img = backdrop(rng)
        paste(img, orl(1 + k % 40, 1 + k % 10), int(rng.integers(100, 161)),
              rng.uniform(160, 480), rng.uniform(140, 340))
        photos.append(img)
    empty = [backdrop(rng) for _ in range(max(1, args.photos // 4))]

    def run(mod, descriptor: str, pictures=photos) -> float:
        t = time.perf_counter()
        for img in pictures:
            chips = [c for _, c in mod.crop_faces(img)]
            if chips:
                embed(net, torch.from_numpy(np.stack(chips)), 150, normalisation="rgb_unit",
                      descriptor=descriptor)
        return time.perf_counter() - t

    run(detect, "flip_mean")  # load the models outside the timings
    run(base, "embedding")
    run(detect, "fused", photos[:2])
    new_t, base_t, new_e, base_e, fused_t = [], [], [], [], []
    for _ in range(args.rounds):
        new_t.append(run(detect, "flip_mean"))
        base_t.append(run(base, "embedding"))
        fused_t.append(run(detect, "fused"))
        new_e.append(run(detect, "flip_mean", empty))
        base_e.append(run(base, "embedding", empty))
    n = len(photos)
    new_ms, base_ms = 1e3 * median(new_t) / n, 1e3 * median(base_t) / n
    fused_ms = 1e3 * median(fused_t) / n
    print(f"{n} photos with a face, {args.rounds} rounds; ms per photo: new {new_ms:.1f}, "
          f"base {base_ms:.1f} ({args.base}); new with the fused descriptor {fused_ms:.1f}")
    print(f"{len(empty)} pictures with no face: ms per picture: new "
          f"{1e3 * median(new_e) / len(empty):.1f} (HOG, padded retry, CNN), base "
          f"{1e3 * median(base_e) / len(empty):.1f}")
    footer()
    print(f"identify_speed: ratio={base_ms / new_ms:.3f} new_ms={new_ms:.1f} "
          f"base_ms={base_ms:.1f} fused_ratio={base_ms / fused_ms:.3f} fused_ms={fused_ms:.1f} "
          "(bar: ratio >= 0.8)")


if __name__ == "__main__":
    main()
