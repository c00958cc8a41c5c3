"""Calibration: where the threshold lands, and how scores move with photos per person.

    .venv/bin/python bench/calibration.py [--threads N] [--draws 10] [--no-finetune]

Faces: ORL, and the same people's faces placed uncropped in harsh-light photos
(testkit/scenes.py), through ``facegrad.recognition.detect.crop_one``; descriptors of the
pretrained network.
People s01-s20 are where the calibration rule was chosen, s21-s40 confirm it; each draw takes
10 known people (7 photos in the gallery, 3 asked about) and 5 strangers (all 10 photos asked
about) from one half.

1. Photos per person: the mean score of a known face against its own person's best photo, and
   the 95th percentile of strangers' best scores, with 1, 3, 5 and 7 photos per person in the
   gallery. A face's score is a maximum over its person's photos, so it rises with their number.
2. Two calibrations of the same gallery, each from the gallery alone, then applied to the
   draw's real probes:
   - half: each person in turn enrolled from half of their photos and probed with the other
     half, and a stranger to everyone else (how calibration worked before: the threshold sits
     where half-size galleries put known faces);
   - leave-out (what the service does, ``facegrad.recognition.open_set``): each photo against the
     gallery less itself, and each person as a stranger to everyone else's full set.
   Both with the equal-error rule; reported: threshold, known named, strangers rejected.
3. Fine-tuning and the gap (unless ``--no-finetune``): one default job on ORL s01-s30 (6 people
   held out), and the gap between the held-out people's known scores (1st percentile) and their
   stranger scores (99th percentile) with the pretrained and the fine-tuned network, in units of
   the scores' pooled standard deviation.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _common import device_parser, footer, header, pretrained_dir, setup, table

import numpy as np  # isort: skip
import torch  # isort: skip


def describe_sets(device):
    from facegrad.recognition.detect import crop_one
    from facegrad.recognition.gallery import embed
    from facegrad.recognition.models import PretrainedFace
    from facegrad.training.loop import pretrained_state
    from testkit.harness import orl_folder
    from testkit.scenes import photo_set

    folder = orl_folder()
    names = sorted(folder)
    net = PretrainedFace(2)
    net.backbone.load_state_dict(pretrained_state(pretrained_dir()))
    net = net.to(device)
    photos = photo_set(names, 2026)
    from facegrad.data.imageio import decode_image

    sets = {"orl": [decode_image(p.read_bytes(), filename=p.name)
                    for n in names for p in folder[n]],
            "photos": [img for n in names for img in photos[n]]}
    out, chips_of = {}, {}
    for key, imgs in sets.items():
        chips = [crop_one(img) for img in imgs]
        keep = np.array([c is not None for c in chips])
        x = np.stack([c for c in chips if c is not None])
        emb = embed(net, x, 150, device, normalisation="rgb_unit")
        labels = np.repeat(np.arange(len(names)), 10)[keep]
        image_index = np.tile(np.arange(10), len(names))[keep]
        out[key] = (emb, torch.from_numpy(labels), image_index)
        chips_of[key] = (x, labels)
        print(f"{key}: {keep.sum()} of {len(imgs)} images with a face", flush=True)
    return out, chips_of, names


def draw(rng, labels, index, people):
    """(gallery rows, owners 0..9, probe rows, probe owners, stranger rows) of one draw."""
    perm = rng.permutation(people)
    known, strangers = perm[:10], perm[10:15]
    g, go, pr, po = [], [], [], []
    for j, p in enumerate(known):
        rows = np.flatnonzero(labels == p)
        order = rng.permutation(rows)
        g += list(order[3:])
        go += [j] * len(order[3:])
        pr += list(order[:3])
        po += [j] * len(order[:3])
    s = [r for p in strangers for r in np.flatnonzero(labels == p)]
    return (torch.tensor(g), torch.tensor(go), torch.tensor(pr), torch.tensor(po),
            torch.tensor(s))


def half_scores(emb, owner, n):
    """Known (correct, score) and stranger scores with each person enrolled from half their
    photos and probed with the other half, and as a stranger to everyone else."""
    from facegrad.recognition.open_set import identity_best

    ok, known, stranger = [], [], []
    sims = emb @ emb.t()
    for p in range(n):
        mine = torch.nonzero(owner == p).view(-1)
        halves = (mine[: len(mine) // 2], mine[len(mine) // 2:])
        for probe in halves:  # enrolled from the other half
            keep = torch.ones(len(owner), dtype=torch.bool)
            keep[probe] = False
            s = sims[probe][:, keep]
            best, score = identity_best(s, owner[keep], n)
            ok.append(best == p)
            known.append(score)
        s = sims[mine][:, owner != p]
        stranger.append(identity_best(s, owner[owner != p], n)[1])
    return torch.cat(ok), torch.cat(known), torch.cat(stranger)


def main() -> None:
    ap = device_parser(__doc__.splitlines()[0])
    ap.add_argument("--draws", type=int, default=10)
    ap.add_argument("--no-finetune", action="store_true")
    args = ap.parse_args()
    device = setup(args)
    header("calibration: photos per person, half-split vs leave-out, fine-tuning", device)
    from facegrad.recognition.open_set import (
        equal_error_threshold,
        identity_best,
        leave_out_scores,
    )

    sets, chips_of, names = describe_sets(device)
    rng = np.random.default_rng(0)

    # 1. photos per person
    rows = []
    for key, (emb, labels, _) in sets.items():
        lab = labels.numpy()
        for k in (1, 3, 5, 7):
            known, stranger = [], []
            for _ in range(args.draws):
                g, go, pr, po, s = draw(rng, lab, None, np.arange(40))
                keep = torch.cat([torch.nonzero(go == j).view(-1)[:k] for j in range(10)])
                g, go = g[keep], go[keep]
                b, sc = identity_best(emb[pr] @ emb[g].t(), go, 10)
                known.append(sc[b == po])
                stranger.append(identity_best(emb[s] @ emb[g].t(), go, 10)[1])
            known, stranger = torch.cat(known), torch.cat(stranger)
            rows.append([key, k, float(known.mean()), float(torch.quantile(known, 0.05)),
                         float(torch.quantile(stranger, 0.95))])
    print("\n1. scores against the gallery by photos per person (all 40 people, "
          f"{args.draws} draws of 10 known + 5 strangers)")
    print(table(["set", "photos/person", "known mean", "known 5th pct", "strangers 95th pct"],
                rows))

    # 2. half-split vs leave-out calibration
    rows = []
    for key, (emb, labels, _) in sets.items():
        lab = labels.numpy()
        for half_name, people in (("s01-s20", np.arange(20)), ("s21-s40", np.arange(20, 40))):
            res = {"half": [], "leave-out": []}
            for _ in range(args.draws):
                g, go, pr, po, s = draw(rng, lab, None, people)
                ge = emb[g]
                lo = leave_out_scores(ge, go, 10, torch.arange(10))
                thr = {"leave-out": equal_error_threshold(
                    lo["known_score"][lo["known_ok"]], lo["stranger_score"])}
                ok, kn, st = half_scores(ge, go, 10)
                thr["half"] = equal_error_threshold(kn[ok], st)
                b, sc = identity_best(emb[pr] @ ge.t(), go, 10)
                ss = identity_best(emb[s] @ ge.t(), go, 10)[1]
                for name, t in thr.items():
                    res[name].append((t, float(((b == po) & (sc >= t)).float().mean()),
                                      float((ss < t).float().mean())))
            for name, v in res.items():
                a = np.array(v)
                rows.append([key, half_name, name, a[:, 0].mean(), a[:, 1].mean(),
                             a[:, 1].min(), a[:, 2].mean(), a[:, 2].min()])
    print(f"\n2. calibration from the gallery alone, applied to real probes ({args.draws} draws "
          "of 10 known + 5 strangers per half)")
    print(table(["set", "people", "calibration", "threshold", "known named", "worst draw",
                 "strangers rejected", "worst draw"], rows))

    # 3. fine-tuning and the gap
    if not args.no_finetune:
        from facegrad.data.store import FaceArrays
        from facegrad.recognition.inference import LoadedModel
        from facegrad.training.config import TrainConfig

        x, lab = chips_of["orl"]
        keep = lab < 30
        data = FaceArrays(x[keep], lab[keep], names[:30])
        from facegrad.pipeline import run_training_job

        with tempfile.TemporaryDirectory() as d:
            res = run_training_job(TrainConfig(device=device.type), data, Path(d) / "run",
                                   pretrained_dir=pretrained_dir())
            held = res.open_set["fine_tuning"]["held_out"]
            tuned = LoadedModel(res.model_path.parent).gallery.emb
            pre = sets["orl"][0][torch.from_numpy(keep)]
        owner = torch.from_numpy(lab[keep])
        honest = torch.tensor([names.index(h) for h in held])
        rows = []
        for name, emb in (("pretrained", pre), ("fine-tuned", tuned)):
            sc = leave_out_scores(emb, owner, 30, honest)
            k, s = sc["known_score"][sc["known_ok"]].double(), sc["stranger_score"].double()
            sd = float(torch.sqrt((k.var() + s.var()) / 2))
            gap = float(torch.quantile(k, 0.01) - torch.quantile(s, 0.99))
            rows.append([name, float(k.mean()), float(s.mean()), gap, gap / sd])
        print(f"\n3. held-out people {', '.join(held)} after a default job on ORL s01-s30 "
              f"(kept: {res.open_set['fine_tuning']['kept']})")
        print(table(["network", "known mean", "stranger mean", "gap (1st - 99th pct)",
                     "gap / pooled sd"], rows))
    footer()


if __name__ == "__main__":
    main()
