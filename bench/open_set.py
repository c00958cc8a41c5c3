"""Open-set identification on ORL, with the training code itself (no service).

    .venv/bin/python bench/open_set.py [--threads N] [--image-size N] [--epochs N]
                                       [--known 30] [--out DIR]

Trains the default model (``--epochs 0``: the pretrained network as it is) on the first
``--known`` ORL subjects (testkit/harness.py's split: 7
training images each) and reports, at the threshold the run calibrated itself:

- known: the held-out images (3 per subject) identified correctly;
- rejected: the images of the other subjects (never seen) answered "unknown";
- enrolled / rejected after: 5 of those strangers enrolled from 5 images each, their other 25
  images identified, and the remaining 5 strangers still rejected;
- verify: same/different-person pairs of the known subjects' held-out images (all pairs,
  balanced accuracy) and of the strangers' images, at the calibrated verify threshold;
- the best threshold in hindsight ("oracle") for known vs rejected, for reference only.

With ``--known 40`` it trains on all subjects and reports the closed-set accuracy on the 120
held-out images (held-out calibration identities included). tests/test_open_set.py checks the
same figures through the service.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _common import (
    crops_of,
    device_parser,
    face_arrays,
    footer,
    header,
    orl_split,
    pretrained_dir,
    setup,
)

import numpy as np  # isort: skip
import torch  # isort: skip


def balanced_pairs(emb: torch.Tensor, labels: np.ndarray, thr: float) -> float:
    s = (emb @ emb.t()).numpy()
    iu = np.triu_indices(len(labels), 1)
    same = (labels[:, None] == labels[None, :])[iu]
    sv = s[iu]
    return 0.5 * ((sv[same] >= thr).mean() + (sv[~same] < thr).mean())


def main() -> None:
    p = device_parser(__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=None)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--known", type=int, default=30)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    device = setup(args)
    header("open-set identification (ORL)", device)
    from facegrad.pipeline import run_training_job
    from facegrad.recognition.inference import LoadedModel
    from facegrad.training.config import TrainConfig

    tr, te = orl_split()
    names = sorted(tr)
    known, strangers = names[:args.known], names[args.known:]
    cfg = {"device": device.type}
    if args.image_size:
        cfg["image_size"] = args.image_size
    if args.epochs is not None:  # 0: the pretrained network as it is
        cfg["epochs"] = args.epochs
    cfg = TrainConfig.model_validate(cfg)
    out = args.out or Path(tempfile.mkdtemp(prefix="open-set-"))
    t0 = time.perf_counter()
    run_training_job(cfg, face_arrays({n: tr[n] for n in known}), out,
                     pretrained_dir=pretrained_dir())
    seconds = time.perf_counter() - t0
    lm = LoadedModel(out)
    os_ = lm.meta["open_set"]
    print(f"trained on {len(known)} subjects in {seconds:.1f} s; calibration: "
          + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in os_.items() if k != "held_out"))
    ek = lm.embed(crops_of([q for n in known for q in te[n]]))
    yk = [n for n in known for _ in te[n]]
    m = lm.match(ek, 1)
    rows = [("known identified", np.mean([a[0] == b for a, b in zip(m, yk)])),
            ("known closed-set", np.mean([a[2][0][0] == b for a, b in zip(m, yk)]))]
    held = set(os_.get("held_out", []))
    if held:
        rows.append(("  of them held out of training",
                     np.mean([a[0] == b for a, b in zip(m, yk) if b in held])))
    vthr = os_["verify_threshold"]
    verify = [("verify, known pairs", balanced_pairs(ek, np.array(yk), vthr))]
    if strangers:
        sp = {n: sorted(tr[n] + te[n]) for n in strangers}
        eu = lm.embed(crops_of([q for n in strangers for q in sp[n]]))
        mu = lm.match(eu, 1)
        rows.append(("strangers rejected", np.mean([a[0] is None for a in mu])))
        sk, ck = np.array([a[1] for a in m]), np.array([a[2][0][0] == b for a, b in zip(m, yk)])
        su = np.array([a[1] for a in mu])
        best = max((min((ck & (sk >= t)).mean() / 0.95, (su < t).mean() / 0.9), t)
                   for t in np.linspace(0, 1, 1001))
        t = best[1]
        rows.append((f"  oracle threshold {t:.3f}: known / rejected",
                     f"{(ck & (sk >= t)).mean():.3f} / {(su < t).mean():.3f}"))
        enrolled, others = strangers[:5], strangers[5:]
        idx = {n: i * 10 for i, n in enumerate(strangers)}
        for n in enrolled:
            lm.gallery.enroll(n, eu[idx[n]:idx[n] + 5])
        ee = torch.cat([eu[idx[n] + 5:idx[n] + 10] for n in enrolled])
        me = lm.match(ee, 1)
        ye = [n for n in enrolled for _ in range(5)]
        rows.append(("enrolled identified", np.mean([a[0] == b for a, b in zip(me, ye)])))
        mo = lm.match(torch.cat([eu[idx[n]:idx[n] + 10] for n in others]), 1)
        rows.append(("remaining strangers rejected", np.mean([a[0] is None for a in mo])))
        verify.append(("verify, stranger pairs",
                       balanced_pairs(eu, np.repeat(np.arange(len(strangers)), 10), vthr)))
    for k, v in rows + verify:
        print(f"{k:44s} {v if isinstance(v, str) else f'{v:.3f}'}")
    footer()


if __name__ == "__main__":
    main()
