"""Face detection rates and cost of facegrad.recognition.detect (dlib's HOG detector, then its
CNN detector, run in PyTorch, where HOG finds nothing, + 5 landmarks), on ORL and CFP faces.

    .venv/bin/python bench/detection.py [--per-cell 40] [--seed 0] [--cfp 200]
                                        [--cnn-compare 40] [--detect-side 960]
                                        [--max-upscale 2.0]

- ORL bare: the 400 ORL images (92×112) as they are: found by the detector directly, by the
  retry on the image with a replicated border, by the CNN detector, or taken as a face crop by
  the tight-crop rule.
- CFP x3: ``--cfp`` frontal and ``--cfp`` profile photos of ../shared/data/cfp_dev (evenly
  spread over its people), enlarged 3× so that the tight-crop rule cannot take them: found by
  which stage. "HOG alone" in the summary is what the detector without the CNN finds.
- placed: ``--per-cell`` ORL faces (image 1 of each subject, then image 6, ...) enlarged so that
  the ORL frame is 60, 100 or 160 px high, turned 0 or ±15°, pasted at a random spot of a
  640×480 blurred-noise picture: found when a box's centre lies within 0.35 face heights of
  the face's centre and its side is 0.4-1.2 face heights; "eyes deg" is the median error of
  the eye line's angle (from the 5 landmarks) against the same face's eye line in its bare ORL
  image, turned; "other" counts boxes away from the face.
- two faces: two ORL faces side by side (frames 160 and 100 px high; HOG boxes come
  in steps of 6/5, so faces closer in size may get equal boxes): both found, biggest first.
- no face: the blurred-noise pictures alone; boxes found in them.
- ms per 640×480 image: median of ``crop_faces`` (detect + landmarks + chips) over the placed
  pictures with a 100 px face, and of ``find_faces`` over the pictures with no face (every
  stage runs: HOG, the padded retry, the CNN); wall time
  and this process's CPU time (dlib runs on one thread; CPU time is what the figure would be on
  an idle machine).
- CNN stage: the PyTorch port of dlib's CNN detector (facegrad.recognition.mmod) against
  dlib-bin's own on ``--cnn-compare`` CFP profile photos at the size the stage scans: in how
  many it gives the same boxes (those scoring clear of the threshold), and ms per picture on
  one thread, alone and in batches of 8 pictures of one size, beside dlib-bin's (the ratio).

``--detect-side`` / ``--max-upscale`` override ``facegrad.recognition.detect``'s constants, to
compare.
"""

from __future__ import annotations

import argparse
import time

from _common import ORL, box_agreement, footer, header, median, table

import cv2  # isort: skip
import numpy as np  # isort: skip
from PIL import Image  # isort: skip
from testkit.scenes import paste  # isort: skip

CFP = ORL.parent / "cfp_dev"
W, H = 640, 480
HEIGHTS = (60, 100, 160)
TURNS = (0, 15, -15)


def orl(subject: int, image: int) -> np.ndarray:
    return np.asarray(Image.open(ORL / f"s{subject:02d}" / f"{image:02d}.png").convert("RGB"))


def backdrop(rng: np.random.Generator) -> np.ndarray:
    """640×480 RGB texture: blurred noise at two scales, tinted."""
    fine = cv2.GaussianBlur(rng.normal(0, 1, (H, W)).astype(np.float32), (0, 0), 2)
    coarse = cv2.GaussianBlur(rng.normal(0, 1, (H, W)).astype(np.float32), (0, 0), 8)
    g = cv2.normalize(fine / fine.std() + 2 * coarse / coarse.std(), None, 0, 255,
                      cv2.NORM_MINMAX)
    tint = rng.uniform(0.7, 1.0, 3).astype(np.float32)
    return np.clip(g[:, :, None] * tint, 0, 255).astype(np.uint8)


def hit(box, cx: float, cy: float, height: int) -> bool:
    x, y, w, h = box
    return (abs(x + w / 2 - cx) <= 0.35 * height and abs(y + h / 2 - cy) <= 0.35 * height
            and 0.4 * height <= max(w, h) <= 1.2 * height)


def eye_angle(points: np.ndarray) -> float:
    """Angle in degrees of the line from the image-left eye to the image-right eye."""
    a, b = sorted([points[0:2].mean(0), points[2:4].mean(0)], key=lambda p: p[0])
    return float(np.degrees(np.arctan2(b[1] - a[1], b[0] - a[0])))


def cnn_against_dlib(n: int, batch: int = 8) -> dict:
    """The CNN stage (facegrad.recognition.mmod, dlib's detector in PyTorch) against dlib-bin's
    own on ``n`` CFP profile photos scanned as detect._scan_cnn scans them (longest side
    CNN_SIDE): boxes whose score is clear of the threshold must be dlib's, and its time per
    picture alone, in batches of ``batch`` pictures of one size (the photos resized to
    4:3), and dlib-bin's, each median of 3 rounds, one thread."""
    import dlib
    import torch

    from facegrad.recognition import detect

    files = sorted(CFP.glob("*/profile_*.jpg"))
    files = [files[int(k)] for k in np.linspace(0, len(files) - 1, n)]
    side = detect.CNN_SIDE
    pics = []
    for f in files:
        img = np.asarray(Image.open(f).convert("RGB"))
        pics.append(np.ascontiguousarray(detect._resized(img, side / max(img.shape[:2]))))
    ours = detect._load_cnn()
    theirs = dlib.cnn_face_detection_model_v1(str(detect.predictor_path(detect.CNN_FILE)))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        same, diff, _ = box_agreement(
            ([(d.rect, d.confidence) for d in ours.detect(pic)[0]],
             [((d.rect.left(), d.rect.top(), d.rect.right(), d.rect.bottom()), d.confidence)
              for d in theirs(pic, 0)]) for pic in pics)
        shape = (side * 3 // 4, side)
        even = [cv2.resize(p, shape[::-1], interpolation=cv2.INTER_AREA) for p in pics]
        groups = [np.stack(even[i:i + batch]) for i in range(0, len(even) - batch + 1, batch)]

        def timed(fn) -> float:
            rounds = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                rounds.append(time.perf_counter() - t)
            return 1e3 * median(rounds)

        torch_ms = timed(lambda: [ours.detect(p) for p in pics]) / len(pics)
        batched_ms = timed(lambda: [ours.detect(g) for g in groups]) / (batch * len(groups))
        dlib_ms = timed(lambda: [theirs(p, 0) for p in pics]) / len(pics)
    finally:
        torch.set_num_threads(threads)
    return {"n": len(pics), "side": side, "same": same, "score_diff": diff,
            "torch_ms": torch_ms, "batched_ms": batched_ms, "dlib_ms": dlib_ms,
            "batch": batch, "batch_size": f"{shape[1]}x{shape[0]}"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--per-cell", type=int, default=40, help="faces per size and turn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cfp", type=int, default=200, help="CFP photos of each kind")
    p.add_argument("--cnn-compare", type=int, default=40,
                   help="CFP profiles on which the CNN stage is checked against dlib-bin's")
    p.add_argument("--detect-side", type=int, default=None)
    p.add_argument("--max-upscale", type=float, default=None)
    args = p.parse_args()
    if not ORL.is_dir():
        raise SystemExit(f"shared face data not found at {ORL}")
    header("detection: dlib HOG, then dlib's CNN, + 5 landmarks, on ORL and CFP faces")
    from facegrad.recognition import detect

    if args.detect_side:
        detect.DETECT_SIDE = args.detect_side
    if args.max_upscale:
        detect.MAX_UPSCALE = args.max_upscale
    print(f"DETECT_SIDE {detect.DETECT_SIDE}  MAX_UPSCALE {detect.MAX_UPSCALE}  "
          f"PAD_RETRY {detect.PAD_RETRY}  CROP_MAX_SIDE {detect.CROP_MAX_SIDE}  seed {args.seed}")
    detect.find_faces(np.zeros((8, 8, 3), np.uint8))  # load the models outside the timings
    rng = np.random.default_rng(args.seed)
    rows = []

    # ORL bare
    how = {"detector": 0, "padded": 0, "cnn": 0, "crop": 0, "none": 0}
    for s in range(1, 41):
        for i in range(1, 11):
            faces = detect._find(orl(s, i), fallback=True)
            how[faces[0].how if faces else "none"] += 1
    rows.append(["ORL bare 92x112", 400, how["detector"], how["padded"], how["cnn"],
                 how["crop"], 400 - how["none"], "", ""])

    # CFP's frontal and profile web photos (head crops, unaligned), enlarged 3x so that the
    # tight-crop rule cannot take them (the set's originals reach 2,381 px): found by which stage
    cfp_ms = []
    for kind in ("frontal", "profile"):
        files = sorted(CFP.glob(f"*/{kind}_*.jpg"))
        files = [files[int(k)] for k in np.linspace(0, len(files) - 1, args.cfp)]
        how = {"detector": 0, "padded": 0, "cnn": 0, "crop": 0, "none": 0}
        for f in files:
            img = np.asarray(Image.open(f).convert("RGB"))
            img = cv2.resize(img, None, fx=3, fy=3, interpolation=cv2.INTER_CUBIC)
            t = time.perf_counter()
            faces = detect._find(img, fallback=True)
            if kind == "profile":
                cfp_ms.append(1e3 * (time.perf_counter() - t))
            how[faces[0].how if faces else "none"] += 1
        rows.append([f"CFP {kind} x3", len(files), how["detector"], how["padded"], how["cnn"],
                     how["crop"], len(files) - how["none"], "", ""])

    # placed faces; the eye line of each bare ORL face is the reference for the turned ones
    ref = {}
    for s in range(1, 41):
        for i in range(1, 11):
            img = orl(s, i)
            faces = detect._find(img, fallback=True)
            ref[s, i] = eye_angle(detect._landmarks(img, faces[0])) if faces else None
    subjects = [(s, i) for i in (1, 6, 3, 8, 5, 10, 2, 7, 4, 9) for s in range(1, 41)]
    crop_ms, crop_cpu, miss_list = [], [], []
    for height in HEIGHTS:
        for turn in TURNS:
            found = other = 0
            angles = []
            for s, i in subjects[:args.per_cell]:
                img = backdrop(rng)
                m = height * 0.8
                cx, cy = rng.uniform(m, W - m), rng.uniform(m, H - m)
                paste(img, orl(s, i), height, cx, cy, turn)
                if height == 100 and turn == 0:
                    t, c = time.perf_counter(), time.process_time()
                    detect.crop_faces(img)
                    crop_ms.append(1e3 * (time.perf_counter() - t))
                    crop_cpu.append(1e3 * (time.process_time() - c))
                faces = detect._find(img, fallback=False)
                good = [f for f in faces if hit(f.box(W, H), cx, cy, height)]
                other += len(faces) - len(good)
                if good:
                    found += 1
                    if ref[s, i] is not None:
                        got = eye_angle(detect._landmarks(img, good[0]))
                        angles.append(abs(got - (ref[s, i] - turn)))
                else:
                    miss_list.append((height, turn, s, i))
            n = min(args.per_cell, len(subjects))
            rows.append([f"placed h={height} turn={turn:+d}", n, found, 0, 0, 0, found,
                         median(angles), other])

    # two faces side by side, the bigger one on either side
    both = order = 0
    pairs = 20
    for k in range(pairs):
        img = backdrop(rng)
        a, b = 1 + k, 21 + k
        big_left = k % 2 == 0
        xa, xb = (160, 470) if big_left else (470, 160)
        paste(img, orl(a, 1), 160, xa, 240)
        paste(img, orl(b, 1), 100, xb, 240)
        boxes = detect.find_faces(img)
        ok = (len(boxes) == 2 and hit(boxes[0], xa, 240, 160) and hit(boxes[1], xb, 240, 100))
        both += ok
        order += ok and boxes[0][2] * boxes[0][3] > boxes[1][2] * boxes[1][3]
    rows.append(["two faces (160 + 100 px)", pairs, both, 0, 0, 0, both, "", 0])

    # no face
    empty_ms, empty_cpu, false = [], [], 0
    for _ in range(40):
        img = backdrop(rng)
        t, c = time.perf_counter(), time.process_time()
        boxes = detect.find_faces(img)
        empty_ms.append(1e3 * (time.perf_counter() - t))
        empty_cpu.append(1e3 * (time.process_time() - c))
        false += len(boxes)
    rows.append(["no face (noise 640x480)", 40, "", "", "", "", "", "", false])

    cnn = cnn_against_dlib(args.cnn_compare)

    print(table(["case", "images", "detector", "padded", "cnn", "crop rule", "found",
                 "eyes deg", "other"], rows))
    if miss_list:
        print("missed (height, turn, subject, image):", miss_list[:12],
              "..." if len(miss_list) > 12 else "")
    print(f"two faces: biggest first in {order} of {both}")
    print(f"ms per 640x480 image, wall / CPU: crop_faces with one 100 px face "
          f"{median(crop_ms):.1f} / {median(crop_cpu):.1f}; find_faces with no face "
          f"{median(empty_ms):.1f} / {median(empty_cpu):.1f} (HOG, its padded retry and the "
          f"CNN); a CFP profile x3, every stage it goes through: {median(cfp_ms):.0f}")
    print(f"CNN stage on {cnn['n']} CFP profiles at {cnn['side']} px, one thread: the same "
          f"boxes as dlib-bin's in {cnn['same']} of {cnn['n']} (scores within "
          f"{cnn['score_diff']:.1e}); ms per picture: torch {cnn['torch_ms']:.1f}, batched by "
          f"{cnn['batch']} at {cnn['batch_size']} {cnn['batched_ms']:.1f}, dlib-bin "
          f"{cnn['dlib_ms']:.1f}; ratio {cnn['dlib_ms'] / cnn['torch_ms']:.1f}x")
    placed = [r for r in rows if r[0].startswith("placed")]
    cfp = {r[0]: r for r in rows if r[0].startswith("CFP")}
    print(f"summary: ORL bare {rows[0][6]}/400; CFP x3 frontal "
          f"{cfp['CFP frontal x3'][6]}/{args.cfp} profile {cfp['CFP profile x3'][6]}/{args.cfp} "
          f"(HOG alone {sum(cfp['CFP profile x3'][2:4])}); placed {sum(r[6] for r in placed)}/"
          f"{sum(r[1] for r in placed)}; two faces {both}/{pairs}; false boxes on noise {false}; "
          f"{median(crop_ms):.0f} ms per 640x480 image ({median(crop_cpu):.0f} ms CPU), "
          f"{median(empty_ms):.0f} ms with no face; CNN stage {cnn['same']}/{cnn['n']} "
          f"boxes as dlib-bin's, {cnn['dlib_ms'] / cnn['torch_ms']:.1f}x its speed")
    footer()


if __name__ == "__main__":
    main()
