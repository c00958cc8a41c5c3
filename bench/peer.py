"""facegrad against dlib's own face pipeline, on the same ORL splits, bare and in harsh photos.

    .venv/bin/python bench/peer.py [--sets orl,photos] [--threads N] [--quick] [--seed 0]
                                   [--epochs N] [--arch NAME] [--no-facegrad]

Two pipelines, the same images and splits:

- dlib: what the ``face_recognition`` library does. ``dlib.get_frontal_face_detector()``
  upsampled once, the biggest face; 5-point ``dlib.shape_predictor``;
  ``dlib.face_recognition_model_v1(...).compute_face_descriptor(img, shape)`` (the 150x150
  aligned chip, padding 0.25); a probe takes the identity of the nearest enrolled image by
  euclidean distance, "unknown" beyond the library's tolerance of 0.6. An image of 160 px or
  less (its shorter side: a face crop, such as bare ORL) where no face is found is described
  with the whole image as the face box, as a caller of ``face_recognition`` passes
  ``known_face_locations`` for crops; a bigger picture with no face found has no descriptor.
- facegrad: its public functions only.
  ``facegrad.recognition.detect.crop_one(rgb, "auto")`` per image,
  ``facegrad.pipeline.run_training_job`` (default TrainConfig, or ``--epochs``/``--arch``) on the
  training images, ``facegrad.recognition.inference.LoadedModel`` to embed and ``match``, and
  ``lm.gallery.enroll`` for strangers, as bench/open_set.py does.

For both, an image with no face (no crop, no descriptor) is left out of training/enrolment and
answered "unknown" as a probe; the "no face" column counts them.

Sets: "orl" (the bare 92x112 ORL images) and "photos" (testkit/scenes.photo_set: each ORL image
uncropped in a 320x243 photo with textured background, turned up to 15 degrees, harsh side
light). Photo ``i`` of a person is their ORL image ``i``, so both sets share one split:
testkit/harness.py's (per person, 3 of 10 held out; random.Random(1234)).

Per set:
- closed: all identities enrolled from their 7 training images; the 3 held out each named
  right (right identity, not "unknown");
- open set, people drawn by ``numpy.random.default_rng(seed).permutation`` of the sorted
  identities (printed): orl 30 known / 10 strangers, photos 10 known / 5 strangers (the first
  10 + 5 of its own draw, seed + 1). known: the known people's held-out images named right;
  rejected: every image of the strangers answered "unknown"; enrolled: 3 strangers enrolled
  from their images 1-5, their images 6-10 named right; known@5%: threshold-free, the score
  (facegrad: match confidence; dlib: minus the distance) that only 5 % of the strangers'
  images exceed, and the share of known held-out images whose best identity is right and
  scores above it.

Last line: ``peer: facegrad_mean=X dlib_mean=Y``, the mean over sets of each side's mean of
known, rejected and enrolled.
"""

from __future__ import annotations

import importlib.util
import tempfile
import time
import traceback
from pathlib import Path

from _common import ORL, device_parser, footer, header, orl_split, pretrained_dir, setup, table

import numpy as np  # isort: skip
from PIL import Image  # isort: skip

from testkit.scenes import photo_set  # isort: skip

TOLERANCE = 0.6   # face_recognition's default tolerance
CROP_SIDE = 160   # an image this small (shorter side) with no face found is a face crop
N_ENROLLED = 3    # strangers enrolled in the open set
ENROL_FROM = 5    # ... from their first 5 images, named on the others
FAR = 0.05        # stranger acceptance for known@5%
OPEN = {"orl": (30, 10), "photos": (10, 5)}           # known, strangers
OPEN_QUICK = {"orl": (8, 4), "photos": (6, 3)}
QUICK_IDENTITIES = {"orl": 12, "photos": 9}


class SideFailed(Exception):
    pass


# --- the sets ---------------------------------------------------------------------------------

def load_set(name: str, identities: list[str], seed: int) -> dict[str, list[np.ndarray]]:
    """{identity: its 10 pictures as RGB uint8}, in the ORL images' sorted order."""
    if name == "orl":
        return {n: [np.asarray(Image.open(p).convert("RGB"))
                    for p in sorted((ORL / n).glob("*.png"))] for n in identities}
    if name == "photos":
        return photo_set(identities, seed)
    raise SystemExit(f"unknown set {name!r} (orl, photos)")


def split_indices() -> dict[str, list[int]]:
    """{identity: indices (0-9) of its 3 held-out images}, testkit/harness.py's split."""
    _, test = orl_split()
    return {n: sorted(int(p.stem) - 1 for p in ps) for n, ps in test.items()}


def draw(identities: list[str], seed: int) -> list[str]:
    return [identities[i] for i in np.random.default_rng(seed).permutation(len(identities))]


# --- dlib ---------------------------------------------------------------------------------------

class Dlib:
    """dlib's detector, 5-point landmarks and ResNet descriptor; nearest enrolled image."""

    name = "dlib"

    def __init__(self):
        try:
            import dlib
        except ImportError as e:
            raise SystemExit("dlib is not installed: .venv/bin/pip install dlib-bin") from e
        spec = importlib.util.find_spec("face_recognition_models")  # never imported: it needs
        if spec is None:  # pkg_resources; only its data files are read
            raise SystemExit("face_recognition_models is not installed: "
                             ".venv/bin/pip install face-recognition-models")
        models = Path(spec.submodule_search_locations[0]) / "models"
        self.dlib = dlib
        self.detector = dlib.get_frontal_face_detector()
        self.landmarks = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self.net = dlib.face_recognition_model_v1(
            str(models / "dlib_face_recognition_resnet_model_v1.dat"))

    def features(self, pictures: list[np.ndarray]) -> list[np.ndarray | None]:
        out = []
        for img in pictures:
            img = np.ascontiguousarray(img)
            faces = self.detector(img, 1)
            if len(faces):
                box = max(faces, key=lambda r: r.width() * r.height())
            elif min(img.shape[:2]) <= CROP_SIDE:
                box = self.dlib.rectangle(0, 0, img.shape[1] - 1, img.shape[0] - 1)
            else:
                out.append(None)
                continue
            shape = self.landmarks(img, box)
            out.append(np.asarray(self.net.compute_face_descriptor(img, shape), np.float32))
        return out

    def fit(self, enrol: dict[str, list]) -> dict:
        gallery = {"emb": np.zeros((0, 128), np.float32), "who": []}
        for n, feats in enrol.items():
            self.enroll(gallery, n, feats)
        return gallery

    def enroll(self, gallery: dict, identity: str, feats: list) -> None:
        feats = [f for f in feats if f is not None]
        if feats:
            gallery["emb"] = np.concatenate([gallery["emb"], np.stack(feats)])
            gallery["who"] += [identity] * len(feats)

    def match(self, gallery: dict, feats: list) -> list[tuple[str | None, str | None, float]]:
        """Per probe: (identity named or None, best identity, score = -distance)."""
        out = []
        for f in feats:
            if f is None or not gallery["who"]:
                out.append((None, None, -np.inf))
                continue
            d = np.linalg.norm(gallery["emb"] - f, axis=1)
            i = int(d.argmin())
            best = gallery["who"][i]
            out.append((best if d[i] <= TOLERANCE else None, best, -float(d[i])))
        return out


# --- facegrad -----------------------------------------------------------------------------------

class Facegrad:
    """facegrad's dataset crop, training, embedding and matching, through public functions."""

    name = "facegrad"

    def __init__(self, overrides: dict):
        try:
            from facegrad.data.store import FaceArrays
            from facegrad.pipeline import run_training_job
            from facegrad.recognition.detect import crop_one
            from facegrad.recognition.inference import LoadedModel
            from facegrad.training.config import TrainConfig
        except Exception as e:
            raise SideFailed(f"importing facegrad failed: {type(e).__name__}: {e}") from e
        self.TrainConfig, self.FaceArrays, self.crop_one = TrainConfig, FaceArrays, crop_one
        self.LoadedModel, self.run_training_job = LoadedModel, run_training_job
        try:
            self.cfg = TrainConfig.model_validate(overrides)
        except Exception as e:
            raise SideFailed(f"TrainConfig({overrides}) refused: {e}") from e
        self.tmp = Path(tempfile.mkdtemp(prefix="peer-"))
        self.runs = 0
        self.train_seconds = 0.0

    def features(self, pictures: list[np.ndarray]) -> list[np.ndarray | None]:
        return [self.crop_one(np.ascontiguousarray(img), "auto") for img in pictures]

    def fit(self, enrol: dict[str, list]):
        names = sorted(n for n in enrol if any(f is not None for f in enrol[n]))
        crops = [(i, f) for i, n in enumerate(names) for f in enrol[n] if f is not None]
        arrays = self.FaceArrays(np.stack([f for _, f in crops]),
                                 np.array([i for i, _ in crops], dtype=np.int64), names)
        self.runs += 1
        run_dir = self.tmp / f"run{self.runs}"
        t0 = time.perf_counter()
        self.run_training_job(self.cfg, arrays, run_dir, pretrained_dir=pretrained_dir())
        self.train_seconds += time.perf_counter() - t0
        return self.LoadedModel(run_dir)

    def enroll(self, lm, identity: str, feats: list) -> None:
        crops = [f for f in feats if f is not None]
        if crops:
            lm.gallery.enroll(identity, lm.embed(np.stack(crops)))

    def match(self, lm, feats: list) -> list[tuple[str | None, str | None, float]]:
        out: list = [(None, None, -np.inf)] * len(feats)
        have = [i for i, f in enumerate(feats) if f is not None]
        if have:
            for i, (named, conf, cands) in zip(have, lm.match(
                    lm.embed(np.stack([feats[i] for i in have])), 1)):
                out[i] = (named, cands[0][0] if cands else None, float(conf))
        return out


# --- the splits ---------------------------------------------------------------------------------

def evaluate(side, feats: dict[str, list], held: dict[str, list[int]], open_draw: list[str],
             n_known: int, n_strangers: int) -> dict:
    """closed, known, rejected, enrolled, known@5% and no-face count for one side on one set."""
    ids = sorted(feats)
    train = {n: [f for i, f in enumerate(feats[n]) if i not in held[n]] for n in ids}
    probes = {n: [feats[n][i] for i in held[n]] for n in ids}
    r = {"no face": sum(f is None for n in ids for f in feats[n])}

    model = side.fit(train)
    got = side.match(model, [f for n in ids for f in probes[n]])
    truth = [n for n in ids for _ in probes[n]]
    r["closed"] = float(np.mean([g[0] == t for g, t in zip(got, truth)]))

    known, strangers = open_draw[:n_known], open_draw[n_known:n_known + n_strangers]
    model = side.fit({n: train[n] for n in known})
    mk = side.match(model, [f for n in known for f in probes[n]])
    tk = [n for n in known for _ in probes[n]]
    ms = side.match(model, [f for n in strangers for f in feats[n]])
    r["known"] = float(np.mean([g[0] == t for g, t in zip(mk, tk)]))
    r["rejected"] = float(np.mean([g[0] is None for g in ms]))
    stranger_scores = np.sort([g[2] for g in ms])[::-1]
    thr = stranger_scores[int(np.floor(FAR * len(stranger_scores)))]  # at most 5 % score above
    r["known@5%"] = float(np.mean([g[1] == t and g[2] > thr for g, t in zip(mk, tk)]))
    enrolled = strangers[:N_ENROLLED]
    for n in enrolled:
        side.enroll(model, n, feats[n][:ENROL_FROM])
    me = side.match(model, [f for n in enrolled for f in feats[n][ENROL_FROM:]])
    te = [n for n in enrolled for _ in feats[n][ENROL_FROM:]]
    r["enrolled"] = float(np.mean([g[0] == t for g, t in zip(me, te)]))
    r["mean"] = float(np.mean([r["known"], r["rejected"], r["enrolled"]]))
    return r


COLUMNS = ["closed", "known", "rejected", "enrolled", "mean", "known@5%"]


def main() -> None:
    p = device_parser(__doc__.split("\n")[0])
    p.add_argument("--sets", default="orl,photos", help="comma-separated: orl, photos")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 12 ORL / 9 photo identities, facegrad 1 epoch")
    p.add_argument("--seed", type=int, default=0,
                   help="draw of the open-set people and of the photos (another seed: other "
                   "people, to confirm on what was not tuned on)")
    p.add_argument("--epochs", type=int, default=None, help="facegrad TrainConfig.epochs")
    p.add_argument("--arch", default=None, help="facegrad TrainConfig.architecture")
    p.add_argument("--no-facegrad", action="store_true", help="the dlib side only")
    args = p.parse_args()
    device = setup(args)
    header("peer: facegrad vs dlib's pipeline (ORL, bare and in photos)", device)
    if not ORL.is_dir():
        raise SystemExit(f"shared face data not found at {ORL}")
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    overrides: dict = {"device": device.type}
    if args.epochs is not None or args.quick:
        overrides["epochs"] = args.epochs if args.epochs is not None else 1
    if args.arch:
        overrides["architecture"] = args.arch
    t_start = time.perf_counter()
    sides: list = [Dlib()]
    fg_error = None
    if not args.no_facegrad:
        try:
            sides.append(Facegrad(overrides))
        except SideFailed as e:
            fg_error = str(e)
            print(f"facegrad: FAILED before any set: {fg_error}")
    held = split_indices()
    all_ids = sorted(held)
    means: dict[str, list[float]] = {"facegrad": [], "dlib": []}
    for k, name in enumerate(sets):
        seed = args.seed + k  # each set its own draw (and the photos their own seed)
        order = draw(all_ids, seed)
        n_known, n_strangers = (OPEN_QUICK if args.quick else OPEN)[name]
        ids = sorted(order[:QUICK_IDENTITIES[name]]) if args.quick else all_ids
        order = [n for n in order if n in ids]
        t0 = time.perf_counter()
        pictures = load_set(name, ids, seed)
        made = time.perf_counter() - t0
        print(f"\n-- set {name}: {len(ids)} people x 10 "
              f"({pictures[ids[0]][0].shape[1]}x{pictures[ids[0]][0].shape[0]}, "
              f"made in {made:.1f} s); closed set {len(ids) * 7} enrolled / {len(ids) * 3} "
              f"probes; open set (draw seed {seed}) known {sorted(order[:n_known])}, "
              f"strangers {order[n_known:n_known + n_strangers]} "
              f"(enrolled: {order[n_known:n_known + N_ENROLLED]})")
        rows = []
        for side in sides:
            t0 = time.perf_counter()
            try:
                feats_t = time.perf_counter()
                feats = {}
                for n in ids:
                    feats[n] = side.features(pictures[n])
                feats_s = time.perf_counter() - feats_t
                r = evaluate(side, feats, held, order, n_known, n_strangers)
            except Exception as e:
                if side.name == "dlib":
                    raise
                tb = traceback.format_exc().strip().splitlines()
                fg_error = f"{type(e).__name__}: {e}"
                print(f"facegrad: FAILED on set {name}: {fg_error}\n  "
                      + "\n  ".join(tb[-6:]))
                rows.append(["facegrad"] + [float("nan")] * len(COLUMNS) + ["n/a", "n/a"])
                continue
            seconds = time.perf_counter() - t0
            means[side.name].append(r["mean"])
            rows.append([side.name] + [r[c] for c in COLUMNS]
                        + [r["no face"], f"{seconds:.0f} ({feats_s:.0f} faces)"])
        if fg_error and len(sides) == 1:
            rows.append(["facegrad"] + [float("nan")] * len(COLUMNS) + ["n/a", "n/a"])
        print(table(["side"] + COLUMNS + ["no face", "seconds"], rows))
    fg = [s for s in sides if s.name == "facegrad"]
    if fg and fg[0].runs:
        print(f"\nfacegrad: {fg[0].runs} training runs, {fg[0].train_seconds:.0f} s; "
              f"config {fg[0].cfg.model_dump(include={'architecture', 'epochs', 'image_size'})}")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    footer()

    def m(xs: list[float]) -> str:
        return f"{np.mean(xs):.3f}" if len(xs) == len(sets) else "n/a"

    print(f"peer: facegrad_mean={m(means['facegrad'])} dlib_mean={m(means['dlib'])}")


if __name__ == "__main__":
    main()
