"""Face verification on a pair protocol (CFP's layout): pretrained network, the default job's
fine-tuned network and dlib's own pipeline, on people the job did not train on.

    .venv/bin/python bench/verification.py [--data ../shared/data/cfp_dev] [--train-folds 1-4]
        [--test-folds 5] [--job '{"epochs": 4}'] [--pretrained '{"descriptor": "fused"}']
        [--no-dlib] [--no-train]
    .venv/bin/python bench/verification.py --url http://127.0.0.1:8000 [...]   (through the API)

The data folder holds one sub-folder of photos per person and ``pairs_<KIND>.tsv`` files
(columns ``fold, same, img1, img2``; the people of one fold appear in no other), as
``../shared/data/cfp_dev`` does with its frontal-frontal (FF) and frontal-profile (FP) pairs.

Library path (default): every photo of the train folds' people and of the test folds' pairs goes
through ``facegrad.recognition.detect.crop_one`` (as upload, identify and verify do); the default
job (``TrainConfig()``, or ``--job`` overrides) runs through ``facegrad.pipeline.run_training_job``
on the train folds' people; the test folds' pairs are scored by the cosine of the two photos'
descriptors, for the pretrained network (epochs 0) and the fine-tuned one.
API path (``--url``): the same photos are uploaded as a dataset, the default job (and an
epochs-0 job for the pretrained network) runs on the server, and every pair goes through
``POST /v1/verify`` with ``compare=similarity``.
dlib's pipeline (library path): what ``face_recognition.face_encodings`` computes (bench/peer.py's
Dlib: HOG upsampled once, 5 landmarks, dlib's ResNet), the whole photo as the box where it finds
no face; scored by minus the euclidean distance.

Per network and pair kind: the protocol's accuracy (per test fold, the threshold best on the
other test folds, or on the fold itself when there is one; mean ± sd over folds), the accuracy
at the model's own verification threshold, TAR at FAR 1e-2 and 1e-3 over the test folds' pairs
(with 350 different-person pairs per fold, FAR 1e-3 is read off the highest scores: a coarse
figure), and pairs refused (a photo with no face found).

Last line: ``verification: fp_pretrained=A fp_tuned=B ff_pretrained=C ff_tuned=D
ff_tuned_at_threshold=E fp_tuned_at_threshold=F refused=N`` (the test folds' means).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

from _common import ROOT, footer, header, table

import numpy as np  # isort: skip
import torch  # isort: skip

DATA = ROOT.parent / "shared" / "data" / "cfp_dev"


def folds_arg(text: str) -> list[int]:
    lo, _, hi = text.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def read_pairs(data: Path, folds: list[int]) -> dict[str, list[tuple[int, bool, str, str]]]:
    """{kind: [(fold, same, img1, img2)]} of the pairs files, for ``folds``."""
    out = {}
    for f in sorted(data.glob("pairs_*.tsv")):
        kind = f.stem.split("_", 1)[1]
        with open(f) as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        out[kind] = [(int(r["fold"]), r["same"] == "1", r["img1"], r["img2"]) for r in rows
                     if int(r["fold"]) in folds]
    return out


def people_of_folds(data: Path, folds: list[int]) -> list[str]:
    """The people (sub-folder names) whose photos appear in the pairs of ``folds``."""
    people = set()
    for rows in read_pairs(data, folds).values():
        for _, _, a, b in rows:
            people |= {a.split("/")[0], b.split("/")[0]}
    return sorted(people)


# --- the protocol -------------------------------------------------------------------------------

def protocol(scored: list[tuple[int, bool, float]], threshold: float | None) -> dict:
    """Figures of [(fold, same, score)] (a refused pair scores -inf)."""
    folds = sorted({f for f, _, _ in scored})
    accs = []
    for k in folds:
        tune = [(s, y) for f, y, s in scored if f != k] or [(s, y) for f, y, s in scored]
        test = [(s, y) for f, y, s in scored if f == k]
        s, y = np.array([t[0] for t in tune]), np.array([t[1] for t in tune])
        cuts = np.unique(s[np.isfinite(s)])
        best = max(cuts, key=lambda t: int(((s >= t) == y).sum()))
        accs.append(float(np.mean([(v >= best) == same for v, same in test])))
    s = np.array([v for _, _, v in scored])
    y = np.array([same for _, same, _ in scored])
    neg = np.sort(s[~y])[::-1]
    out = {"accuracy": statistics.mean(accs),
           "sd": statistics.stdev(accs) if len(accs) > 1 else 0.0,
           "at_threshold": (float(np.mean((s >= threshold) == y)) if threshold is not None
                            else float("nan"))}
    for far in (1e-2, 1e-3):
        cut = neg[max(int(far * len(neg)) - 1, 0)]
        out[f"tar_far_{far:g}"] = float(np.mean(s[y] > cut))
    return out


def score_pairs(pairs, describe: dict[str, np.ndarray | None], similarity):
    scored, refused = [], 0
    for fold, same, a, b in pairs:
        da, db = describe.get(a), describe.get(b)
        if da is None or db is None:
            refused += 1
            scored.append((fold, same, -np.inf))
        else:
            scored.append((fold, same, similarity(da, db)))
    return scored, refused


# --- library path -------------------------------------------------------------------------------

def load_rgb(path: Path) -> np.ndarray:
    from facegrad.data.imageio import decode_image

    return decode_image(path.read_bytes(), filename=path.name)


def chips_of(data: Path, files: list[str]) -> dict[str, np.ndarray | None]:
    from facegrad.recognition.detect import crop_one

    return {f: crop_one(load_rgb(data / f)) for f in files}


def protocol_files(data: Path, pairs, train_people: list[str]) -> tuple[list[str], list[str]]:
    """(the photos of the pairs, those followed by every photo of the training people), as
    paths relative to ``data``."""
    test_files = sorted({f for rows in pairs.values() for _, _, a, b in rows for f in (a, b)})
    return test_files, test_files + [f"{p}/{f.name}" for p in train_people
                                     for f in sorted((data / p).iterdir())]


def train_folder(data: Path, people: list[str], chips: dict[str, np.ndarray | None]):
    """A FaceArrays of the people's photos (those with a face), as dataset building makes it."""
    from facegrad.data.store import FaceArrays

    images, labels = [], []
    for i, p in enumerate(people):
        for f in sorted((data / p).iterdir()):
            c = chips.get(f"{p}/{f.name}")
            if c is not None:
                images.append(c)
                labels.append(i)
    return FaceArrays(np.stack(images), np.array(labels, dtype=np.int64), people)


def library_networks(args, data: Path, pairs) -> list[tuple[str, dict, float | None]]:
    """[(name, {file: descriptor}, verification threshold)] for pretrained and fine-tuned."""
    from facegrad.pipeline import run_training_job
    from facegrad.recognition.inference import LoadedModel
    from facegrad.training.config import TrainConfig

    train_people = people_of_folds(data, args.train_folds)
    t0 = time.perf_counter()
    test_files, files = protocol_files(data, pairs, train_people)
    chips = chips_of(data, files)
    print(f"detect + align: {len(chips)} photos in {time.perf_counter() - t0:.0f} s, "
          f"{sum(c is None for c in chips.values())} with no face", flush=True)
    found = [f for f in test_files if chips[f] is not None]
    stack = np.stack([chips[f] for f in found])
    out = []
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    work = Path(tempfile.mkdtemp(prefix="verification-"))
    jobs = [("pretrained", {"epochs": 0} | json.loads(args.pretrained))]
    if not args.no_train:
        jobs.append(("fine-tuned", json.loads(args.job)))
    for name, overrides in jobs:
        cfg = TrainConfig(**({"device": args.device} | overrides))
        t0 = time.perf_counter()
        res = run_training_job(cfg, train_folder(data, train_people, chips), work / name,
                               pretrained_dir=work / "pretrained")
        lm = LoadedModel(res.model_path.parent, str(device))
        emb = lm.embed(stack).numpy()  # as the service describes faces
        desc = {f: emb[i] for i, f in enumerate(found)}
        ft = res.open_set.get("fine_tuning")
        print(f"{name}: job {time.perf_counter() - t0:.0f} s on {len(train_people)} people "
              f"(folds {args.train_folds[0]}-{args.train_folds[-1]}); verify threshold "
              f"{lm.verify_threshold:.4f}" + (f"; job's own judgement: {json.dumps(ft)}"
                                              if ft else ""), flush=True)
        out.append((name, desc, lm.verify_threshold))
    return out


def dlib_network(data: Path, pairs):
    from peer import Dlib

    d = Dlib()
    files = sorted({f for rows in pairs.values() for _, _, a, b in rows for f in (a, b)})
    feats = d.features([load_rgb(data / f) for f in files])
    return ("dlib pipeline", dict(zip(files, feats)), None)


# --- API path -----------------------------------------------------------------------------------

def api_networks(args, data: Path, pairs):
    """[(name, verify(a, b) -> similarity or None, threshold)] through a running server."""
    import httpx

    c = httpx.Client(base_url=args.url, timeout=600,
                     headers={"X-API-Key": args.key} if args.key else {})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for p in people_of_folds(data, args.train_folds):
            for f in sorted((data / p).iterdir()):
                z.write(f, f"{p}/{f.name}")
    r = c.post("/v1/datasets", files={"file": ("train.zip", buf.getvalue(), "application/zip")},
               data={"name": "verification-train"})
    r.raise_for_status()
    ds = r.json()
    while ds.get("status", "ready") == "ingesting":
        time.sleep(2)
        ds = c.get(f"/v1/datasets/{ds['id']}").json()
    print(f"dataset {ds['id']}: {ds.get('num_images')} images, "
          f"{len(ds.get('rejected') or [])} rejected", flush=True)
    out = []
    jobs = [("pretrained", {"epochs": 0} | json.loads(args.pretrained))]
    if not args.no_train:
        jobs.append(("fine-tuned", json.loads(args.job)))
    for name, overrides in jobs:
        t0 = time.perf_counter()
        job = c.post("/v1/jobs", json={"dataset_id": ds["id"], **overrides}).json()
        while job["status"] not in ("succeeded", "failed", "cancelled"):
            time.sleep(3)
            job = c.get(f"/v1/jobs/{job['id']}").json()
        if job["status"] != "succeeded":
            raise SystemExit(f"job {job['id']} {job['status']}: {job.get('error')}")
        model = job["model_id"]
        print(f"{name}: job {job['id']} in {time.perf_counter() - t0:.0f} s, model {model}",
              flush=True)

        def verify(a: str, b: str, model=model):
            files = [("file", (Path(x).name, (data / x).read_bytes())) for x in (a, b)]
            r = c.post("/v1/verify", files=files,
                       data={"model_id": model, "compare": "similarity"})
            return (r.json()["similarity"], r.json()["threshold"]) if r.status_code == 200 \
                else (None, None)

        out.append((name, verify))
    return out


def pair_data_args(ap: argparse.ArgumentParser) -> None:
    """--data, --train-folds and --test-folds: the pair protocol's data and its split."""
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--train-folds", type=folds_arg, default=folds_arg("1-4"))
    ap.add_argument("--test-folds", type=folds_arg, default=folds_arg("5"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pair_data_args(ap)
    ap.add_argument("--job", default="{}", help="job fields for the fine-tuned network (JSON)")
    ap.add_argument("--pretrained", default="{}",
                    help="job fields for the pretrained network's epochs-0 job (JSON), e.g. "
                    "'{\"descriptor\": \"fused\"}'")
    ap.add_argument("--no-train", action="store_true", help="the pretrained network only")
    ap.add_argument("--no-dlib", action="store_true")
    ap.add_argument("--url", help="measure through this running server's API")
    ap.add_argument("--key", help="X-API-Key for --url")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"no pair data at {args.data}")
    header("verification: pair protocol, people the job did not train on")
    pairs = read_pairs(args.data, args.test_folds)
    print(f"data: {args.data}  train folds {args.train_folds}  test folds {args.test_folds}  "
          f"pairs: {', '.join(f'{k} {len(v)}' for k, v in pairs.items())}  job: {args.job}")
    rows, summary = [], {}
    if args.url:
        for name, verify in api_networks(args, args.data, pairs):
            for kind, kp in pairs.items():
                scored, refused, thr = [], 0, None
                for fold, same, a, b in kp:
                    s, t = verify(a, b)
                    thr = t if t is not None else thr
                    refused += s is None
                    scored.append((fold, same, -np.inf if s is None else s))
                rows.append(row(name, kind, protocol(scored, thr), refused, summary))
    else:
        nets = library_networks(args, args.data, pairs)
        if not args.no_dlib:
            nets.append(dlib_network(args.data, pairs))
        for name, desc, thr in nets:
            sim = (lambda a, b: float(a @ b)) if name != "dlib pipeline" else \
                (lambda a, b: -float(np.linalg.norm(a - b)))
            for kind, kp in pairs.items():
                scored, refused = score_pairs(kp, desc, sim)
                rows.append(row(name, kind, protocol(scored, thr), refused, summary))
    print(table(["network", "pairs", "accuracy", "± sd", "at own thr", "TAR@FAR1e-2",
                 "TAR@FAR1e-3", "refused"], rows))
    footer()
    get = summary.get
    print("verification: " + " ".join(f"{k}={get(k, float('nan')):.4f}" for k in (
        "fp_pretrained", "fp_tuned", "ff_pretrained", "ff_tuned", "ff_tuned_at_threshold",
        "fp_tuned_at_threshold")) + f" refused={int(get('refused', 0))}")


def row(name: str, kind: str, f: dict, refused: int, summary: dict) -> list:
    key = {"pretrained": "pretrained", "fine-tuned": "tuned"}.get(name)
    if key:
        summary[f"{kind.lower()}_{key}"] = f["accuracy"]
        summary[f"{kind.lower()}_{key}_at_threshold"] = f["at_threshold"]
        summary["refused"] = summary.get("refused", 0) + refused
    return [name, kind, f"{f['accuracy']:.4f}", f"{f['sd']:.4f}", f"{f['at_threshold']:.4f}",
            f"{f['tar_far_0.01']:.4f}", f"{f['tar_far_0.001']:.4f}", refused]


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
