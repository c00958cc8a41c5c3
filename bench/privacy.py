"""Private training (DP-SGD): is the mechanism what the accountant assumes, does the guarantee
hold against a membership-inference attack, and what does it cost in accuracy and time.

    .venv/bin/python bench/privacy.py [--quick] [--people 128] [--epochs 16]
        [--epsilons 1,3,8] [--unit person|image] [--threads N] [--out-md docs/privacy.md]
        [--job '{"freeze_stages": 5}' --label freeze5] [--baseline-job '{"freeze_stages": 4}']

Through the library (``facegrad.training.loop.train``, the training a job runs), on CPU:

1. Exactness. Per-example clipping (``PerExampleClipper`` over Opacus' per-sample gradients)
   against the definition, a loop over single units with ``torch.autograd.grad``: on a small
   model built of this project's layers (conv, dlib's per-channel affine, linear, the CosFace
   head), per image and per person (a person's photos summed, then clipped), with every unit
   clipped and with none, person rows grouped as ``private_step`` groups them; and on a
   dlib_resnet's last residual stage, projection and head (freeze_stages 4) on a few photos;
   in float32 (rounding) and float64 (the bar). Then the noise: the clipper's output for
   all-zero gradients has sd sigma * C / expected units.
2. Accounting. Every private run's epsilon (Opacus' accountant, as the job reports it) against
   Google's dp-accounting for the same sigma, sampling rate q, steps and delta (PLD for the
   'prv' accountant, RDP for 'rdp'); R = ours / theirs.
3. Membership inference. ``--people`` people of CFP's folds 1-4 (seeded), half members and half
   non-members (unit person; unit image: every one of them trained on, half of each person's
   photos members). Fine-tuned on the members for 16 epochs (long enough for a non-private
   model to remember them): the service's non-private job training the last residual stage,
   projection and head (freeze_stages 4, the fewest frozen stages the cached trunk below
   allows; clip mode 'norm', head imprinted, batch_size 32; ``--baseline-job '{}'`` trains the
   private jobs' layers instead), and DP-SGD jobs at their defaults (projection and head,
   expected_batch_size unset) at each target epsilon (delta 1e-5, clip 'per_example'), all
   with the same epochs, learning rate and seed, no calibration people and no validation
   split. Attacks (Yeom et al. 2018's threshold on a
   per-example score, for a face-descriptor model): a photo's score is the cosine similarity of
   its descriptor to the mean descriptor of its person's other photos (unit image: of their
   member photos), since training pulls a member's photos together; 'calibrated' subtracts the
   same score under the pretrained network, which anyone can download (a reference-model
   attack, stronger). ROC AUC of members' vs non-members' photos; the figure the bars read is
   the stronger attack's. The pretrained network's plain AUC is a sanity check (about 0.5: it
   trained on none of them).
4. Utility, on people in neither half: CFP fold 5's frontal-frontal (FF) and frontal-profile
   (FP) pairs with bench/verification.py's protocol, and ORL's 40 people among themselves
   (``open_set.among_themselves``: TPIR at FPIR 0.05, verification accuracy).
5. Cost: a DP step (``private.private_step`` on a Poisson sample of people, noise on, in
   chunks of batch_size) against the normal step (``loop.train_step``, clip 'norm') on the
   same images as one batch, the same trainable layers (the private job's); median over
   rounds of the ratio.

Descriptors: the stem and first three residual stages are frozen in every network measured
(checked), so their output is computed once per photo (and its mirror image) and each network
runs its last stage and projection on it; checked against ``gallery.embed`` (flip_mean) for
every network. Aligned faces are cached in ``var/bench-cache/`` (git-ignored).

Last line: ``eps_ratio=R mia_auc_eps8=A mia_auc_nonprivate=B ff_eps8=F ff_nonprivate=G
step_cost=S`` (R: the run whose ratio is farthest from 1).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import tempfile
import time
from pathlib import Path

from _common import (
    ORL,
    ROOT,
    code_state,
    cpu_model,
    footer,
    header,
    loadavg,
    pretrained_dir,
    table,
    verdict,
)
from verification import DATA, chips_of, people_of_folds, protocol, read_pairs, score_pairs

import numpy as np  # isort: skip
import torch  # isort: skip
import torch.nn.functional as F  # isort: skip
from torch import nn  # isort: skip

CACHE = ROOT / "var" / "bench-cache" / "privacy-faces.npz"
DOC = ROOT / "docs" / "privacy.md"
BEGIN, END = "<!-- privacy-results:begin -->", "<!-- privacy-results:end -->"
DELTA = 1e-5


# --- aligned faces, cached ---------------------------------------------------------------------

def faces(cfp: Path, cfp_files: list[str], orl_files: list[Path]) -> dict[str, np.ndarray | None]:
    """{key: 150x150 aligned face or None}: CFP photos through bench/verification.py's
    ``chips_of`` (``detect.crop_one``), ORL's as ``_common.crops_of`` makes them ("orl/..."
    keys); cached."""
    from _common import crops_of

    have: dict[str, np.ndarray | None] = {}
    if CACHE.is_file():
        z = np.load(CACHE)
        for k, ok, c in zip(z["keys"].tolist(), z["found"], z["chips"]):
            have[k] = c if ok else None
    want_cfp = [f for f in cfp_files if f not in have]
    want_orl = [p for p in orl_files if orl_key(p) not in have]
    if want_cfp or want_orl:
        t0 = time.perf_counter()
        have |= chips_of(cfp, want_cfp)
        for p in want_orl:
            have[orl_key(p)] = crops_of([p])[0]
        print(f"detect + align: {len(want_cfp) + len(want_orl)} photos in "
              f"{time.perf_counter() - t0:.0f} s (cached in {CACHE.relative_to(ROOT)})",
              flush=True)
        keys = sorted(have)
        shape = next(c.shape for c in have.values() if c is not None)
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE.with_suffix(".tmp.npz")
        np.savez(tmp, keys=np.array(keys), found=np.array([have[k] is not None for k in keys]),
                 chips=np.stack([have[k] if have[k] is not None else np.zeros(shape, np.uint8)
                                 for k in keys]))
        tmp.replace(CACHE)
    return {k: have[k] for k in cfp_files + [orl_key(p) for p in orl_files]}


def orl_key(p: Path) -> str:
    return f"orl/{p.parent.name}/{p.name}"


# --- descriptors: the frozen trunk once, each network's last stage on it ----------------------

def prepare(chips: np.ndarray) -> torch.Tensor:
    """What ``gallery.embed`` feeds the network (resized, normalised), float32 NCHW."""
    from facegrad.data.preprocess import normaliser, resize_uint8
    from facegrad.recognition.architectures import architecture

    norm = normaliser(architecture("dlib_resnet").normalisation)
    return norm(resize_uint8(torch.from_numpy(chips), 150))


@torch.no_grad()
def trunk_features(backbone, chips: np.ndarray, batch: int = 64) -> tuple[torch.Tensor, ...]:
    """The stem's and first three stages' output for each face and its mirror image."""
    out, flip = [], []
    for i in range(0, len(chips), batch):
        x = prepare(chips[i:i + batch])
        for xs, acc in ((x, out), (x.flip(3), flip)):
            h = (xs * 255.0 - backbone.input_mean[:, None, None]) / 256.0
            h = backbone.stem(h)
            for stage in backbone.stages[:3]:
                h = stage(h)
            acc.append(h)
    return torch.cat(out), torch.cat(flip)


@torch.no_grad()
def descriptors(backbone, feats: tuple[torch.Tensor, torch.Tensor], batch: int = 256):
    """flip_mean descriptors (as ``gallery.embed`` with a PretrainedFace) from trunk features."""
    backbone.eval()
    rows = []
    for i in range(0, len(feats[0]), batch):
        e = [F.normalize(backbone.fc(backbone.stages[3](f[i:i + batch]).mean(dim=(2, 3))), dim=1)
             for f in feats]
        rows.append(F.normalize(e[0] + e[1], dim=1))
    return torch.cat(rows)


def check_trunk(model, reference, chips: np.ndarray, feats, name: str) -> float:
    """The frozen parts equal the pretrained network's, and the fast descriptors equal
    ``gallery.embed``'s on a few faces; returns the largest difference."""
    from facegrad.recognition.architectures import architecture
    from facegrad.recognition.gallery import embed

    b, r = model.backbone, reference.backbone
    for part, ref in zip([b.stem, *b.stages[:3]], [r.stem, *r.stages[:3]]):
        for (k, v), w in zip(part.state_dict().items(), ref.state_dict().values()):
            if not torch.equal(v, w):
                raise SystemExit(f"{name}: frozen layer {k} changed in training")
    n = min(8, len(chips))
    want = embed(model, chips[:n], 150, "cpu", descriptor="flip_mean",
                 normalisation=architecture("dlib_resnet").normalisation)
    got = descriptors(b, (feats[0][:n], feats[1][:n]))
    diff = float((want - got).abs().max())
    if diff > 1e-4:
        raise SystemExit(f"{name}: fast descriptors differ from gallery.embed by {diff:.2e}")
    return diff


# --- the attack and the utility figures -------------------------------------------------------

def auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of scores ``pos`` above ``neg`` (Mann-Whitney, ties counted half)."""
    s = np.concatenate([pos, neg])
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    ranks[order] = np.arange(1, len(s) + 1)
    for v in np.unique(s[np.diff(np.sort(s), prepend=np.nan) == 0]):  # average tied ranks
        ranks[s == v] = ranks[s == v].mean()
    n_p, n_n = len(pos), len(neg)
    return float((ranks[:n_p].sum() - n_p * (n_p + 1) / 2) / (n_p * n_n))


def attack_scores(desc: torch.Tensor, owner: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per photo: cosine similarity of its descriptor to the mean of the ``reference`` photos
    (a mask) of the same person, itself left out."""
    d = desc.numpy().astype(np.float64)
    out = np.empty(len(d))
    for p in np.unique(owner):
        rows = np.flatnonzero(owner == p)
        for i in rows:
            ref = [j for j in rows if j != i and reference[j]]
            m = d[ref].mean(0)
            out[i] = float(d[i] @ m / (np.linalg.norm(m) + 1e-12))
    return out


def utility(desc: dict[str, torch.Tensor], keys: dict[str, list[str]], pairs, orl_owner):
    from facegrad.recognition.open_set import among_themselves

    look = {k: desc["cfp"][i].numpy() for i, k in enumerate(keys["cfp"])}
    out = {}
    for kind, kp in pairs.items():
        scored, refused = score_pairs(kp, look, lambda a, b: float(a @ b))
        f = protocol(scored, None)
        out[kind.lower()] = f["accuracy"]
        out[kind.lower() + "_sd"] = f["sd"]
        out["refused"] = out.get("refused", 0) + refused
    owner = torch.from_numpy(orl_owner)
    o = among_themselves(desc["orl"], owner, torch.unique(owner))
    out["orl_tpir"] = o.get("tpir_at_fpir_0.05", float("nan"))
    out["orl_verify"] = o["verify_accuracy"]
    return out


# --- 1. exactness --------------------------------------------------------------------------------

class Tiny(nn.Module):
    def __init__(self, classes: int = 5):
        from facegrad.recognition.dlib_resnet import Affine
        from facegrad.recognition.models import CosineClassifier

        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.affine = Affine(4)
        self.fc = nn.Linear(4 * 6 * 6, 16)
        self.classifier = CosineClassifier(16, classes, scale=30.0, margin=0.35)

    def forward(self, x, y):
        h = F.relu(self.affine(self.conv(x)))
        emb = F.normalize(self.fc(h.flatten(1)), dim=1)
        return emb, self.classifier(emb, y)


class Forward(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model(x, y)


def clipped_vs_naive(model: nn.Module, x, y, groups: list[list[int]], c: float,
                     per_person: bool, chunk: int) -> tuple[float, float]:
    """(largest |difference| / largest |gradient|, largest |difference|) between the clipper's
    averaged gradient (chunks of ``chunk`` rows) and the naive loop over units."""
    from facegrad.clipping import build_clipper
    from facegrad.clipping.config import ClipPerExample
    from facegrad.training import private

    params = [p for p in model.parameters() if p.requires_grad]
    clipper = build_clipper(ClipPerExample(mode="per_example", max_norm=c), model)
    gsm = private.wrap(Forward(model))
    unit_of = torch.empty(len(y), dtype=torch.long)
    for u, g in enumerate(groups):
        unit_of[g] = u
    # chunks that never split a unit (as UnitSampler makes them)
    bounds, cur = [], []
    for g in groups:
        if cur and len(cur) + len(g) > chunk:
            bounds.append(cur)
            cur = []
        cur = cur + g
    bounds.append(cur)
    for rows in bounds:
        rows_t = torch.tensor(rows)
        loss = F.cross_entropy(gsm(x[rows_t], y[rows_t])[1], y[rows_t], reduction="sum")
        if per_person:  # one row per person, units numbered within the chunk (private_step)
            _, local = torch.unique(unit_of[rows_t], return_inverse=True)
            with private.grouped_rows(local):
                loss.backward()
        else:
            loss.backward()
        clipper.accumulate(params)
    clipper(params)
    got = [p.grad.clone() for p in params]
    gsm.remove_hooks()
    want = [torch.zeros_like(p) for p in params]
    for g in groups:
        gt = torch.tensor(g)
        loss = F.cross_entropy(model(x[gt], y[gt])[1], y[gt], reduction="sum")
        grads = torch.autograd.grad(loss, params)
        norm = float(torch.sqrt(sum(gr.double().pow(2).sum() for gr in grads)))
        for w, gr in zip(want, grads, strict=True):
            w += min(1.0, c / (norm + 1e-6)) * gr
    want = [w / len(groups) for w in want]
    diff = max(float((a - b).abs().max()) for a, b in zip(got, want, strict=True))
    scale = max(float(b.abs().max()) for b in want)
    return diff / scale, diff


def exactness(members: np.ndarray, member_owner: np.ndarray, c: float) -> list[list]:
    from facegrad.recognition.models import PretrainedFace
    from facegrad.training.loop import pretrained_state

    rows = []
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 8, 8, generator=g)
    y = torch.randint(0, 5, (12,), generator=g)
    for dt in (torch.float32, torch.float64):
        for per_person in (False, True):
            groups = ([[i] for i in range(12)] if not per_person else
                      [torch.nonzero(y == k).view(-1).tolist() for k in y.unique()])
            for cc in (0.05, 1e6):
                model = Tiny().to(dt)
                model.conv.requires_grad_(False)
                rel, ab = clipped_vs_naive(model, x.to(dt), y, groups, cc, per_person, 5)
                rows.append(["small model", str(dt)[6:], "person" if per_person else "image",
                             f"{cc:g}", len(groups), rel, ab])
    # the real layers of a private dlib_resnet job (freeze_stages 4: its last stage's
    # convolutions and affines too, projection, head)
    people = np.unique(member_owner)[:3]
    pick = np.concatenate([np.flatnonzero(member_owner == p)[:2] for p in people])
    yr = torch.from_numpy(np.searchsorted(people, member_owner[pick]))
    groups = [np.flatnonzero(yr.numpy() == k).tolist() for k in range(len(people))]
    for dt in (torch.float32, torch.float64):
        xr = prepare(members[pick]).to(dt)
        for cc in (1e-3, c):
            model = PretrainedFace(len(people))
            model.backbone.load_state_dict(pretrained_state(pretrained_dir()))
            model.freeze(4)
            for m in model.modules():
                if isinstance(m, nn.ReLU):
                    m.inplace = False
            rel, ab = clipped_vs_naive(model.to(dt), xr, yr, groups, cc, True, 4)
            rows.append(["dlib_resnet stage 4 + projection + head", str(dt)[6:], "person",
                         f"{cc:g}", len(groups), rel, ab])
    return rows


def noise_sd(plan, params) -> float:
    """Measured sd / (sigma * C / expected units) of the clipper's output for zero gradients."""
    from facegrad.clipping import build_clipper
    from facegrad.clipping.config import ClipPerExample
    from facegrad.training.private import secret_generator

    params = [nn.Parameter(torch.zeros_like(p)) for p in params]
    clipper = build_clipper(ClipPerExample(mode="per_example", max_norm=plan.max_norm),
                            nn.ParameterList(params))
    clipper.set_noise(plan.noise_multiplier, plan.expected_units, secret_generator())
    for p in params:
        p.grad_sample = torch.zeros(1, *p.shape)
    clipper.accumulate(params)
    clipper(params)
    got = float(torch.cat([p.grad.flatten() for p in params]).double().std())
    return got / (plan.noise_multiplier * plan.max_norm / plan.expected_units)


def dp_accounting_epsilon(sigma: float, q: float, steps: int, delta: float, kind: str) -> float:
    from dp_accounting import PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.dp_event import GaussianDpEvent
    from dp_accounting.pld import PLDAccountant
    from dp_accounting.rdp import RdpAccountant

    event = SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), steps)
    acc = PLDAccountant() if kind == "prv" else RdpAccountant()
    return float(acc.compose(event).get_epsilon(delta))


# --- 5. step cost ------------------------------------------------------------------------------

def step_cost(cfg_normal, cfg_private, images: np.ndarray, labels: np.ndarray, rounds: int):
    """Median over rounds of (DP step time / normal step time) on the same Poisson sample."""
    from facegrad.data.batches import make_batches
    from facegrad.data.preprocess import normaliser
    from facegrad.recognition.architectures import architecture
    from facegrad.training import private
    from facegrad.training.loop import make_step_parts, privacy_plan, train_step

    device = torch.device("cpu")
    n_cls = len(np.unique(labels))
    batches = make_batches(images, labels, None, 150, device,
                           normaliser(architecture("dlib_resnet").normalisation), "memory")
    parts_n = make_step_parts(cfg_normal, n_cls, device, pretrained_dir())
    parts_p = make_step_parts(cfg_private, n_cls, device, pretrained_dir())
    plan = privacy_plan(cfg_private, labels)
    sampler = private.UnitSampler(plan, labels, cfg_private.batch_size)
    parts_p.clipper.set_noise(plan.noise_multiplier, plan.expected_units,
                              private.secret_generator())
    gen = torch.Generator().manual_seed(0)
    lr = cfg_normal.learning_rate
    ratios, sizes, t_n, t_p, t_clip = [], [], [], [], []
    inner, clip_s = parts_p.clipper.accumulate, [0.0]

    def timed_accumulate(*a, **k):  # how much of a DP step the clipping itself takes
        t = time.perf_counter()
        inner(*a, **k)
        clip_s[0] += time.perf_counter() - t

    parts_p.clipper.accumulate = timed_accumulate
    draws = sampler.epoch()
    r = -1  # one warm-up round, not counted
    while r < rounds:
        try:
            chunks = next(draws)
        except StopIteration:
            draws = sampler.epoch()
            continue
        pos = torch.cat([c[0] for c in chunks]) if chunks else torch.zeros(0, dtype=torch.long)
        if len(pos) == 0:
            continue
        times = {}
        clip_s[0] = 0.0
        for kind in (("normal", "private") if r % 2 else ("private", "normal")):
            t0 = time.perf_counter()
            if kind == "normal":
                xb, yb = batches.take(pos, gen, True)
                train_step(parts_n, xb, yb, lr)
            else:
                private.private_step(parts_p, chunks, batches, gen, True, lr)
            times[kind] = time.perf_counter() - t0
        if r >= 0:
            ratios.append(times["private"] / times["normal"])
            sizes.append(len(pos))
            t_n.append(times["normal"])
            t_p.append(times["private"])
            t_clip.append(clip_s[0])
        r += 1
    parts_p.forward.remove_hooks()
    return {"ratio": statistics.median(ratios), "images_median": statistics.median(sizes),
            "images_mean": statistics.mean(sizes), "normal_s": statistics.median(t_n),
            "private_s": statistics.median(t_p), "clip_s": statistics.median(t_clip),
            "rounds": len(ratios),
            "ratio_per_image_sd": statistics.stdev(ratios) if len(ratios) > 1 else 0.0}


# --- the plot ----------------------------------------------------------------------------------

def write_plot(path: Path, results: list[dict], pretrained: dict) -> Path:
    """AUC and FF accuracy against epsilon (the non-private model at the right; dashed: chance
    and the pretrained network): a PNG with
    matplotlib when it is installed, else a hand-written SVG beside it."""
    results = sorted([r for r in results if r["rec"] is not None],
                     key=lambda r: r["rec"]["epsilon"]) + [
        r for r in results if r["name"] == "non-private"]
    labels = [r["name"].replace("eps=", "ε=") if r["rec"] else "no DP" for r in results]
    auc_v = [r["mia_auc"] for r in results]
    ff_v = [r["ff"] for r in results]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        plt = None
    if plt is not None:
        path = path.with_suffix(".png")
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for ax, ys, base, title in ((axes[0], auc_v, 0.5, "membership-inference AUC"),
                                    (axes[1], ff_v, pretrained["ff"], "FF accuracy, fold 5")):
            ax.plot(range(len(ys)), ys, marker="o")
            ax.axhline(base, ls="--", color="grey", lw=1)
            ax.set_xticks(range(len(ys)), labels)
            ax.set_title(title)
        fig.tight_layout()
        fig.savefig(path, dpi=80)
        return path
    path = path.with_suffix(".svg")
    w, h, pad = 300, 220, 40
    parts = []
    for k, (ys, base, title, lo, hi) in enumerate((
            (auc_v, 0.5, "membership-inference AUC (dashed: chance)", 0.4, 1.0),
            (ff_v, pretrained["ff"], "FF accuracy, fold 5 (dashed: pretrained)",
             min(ff_v + [pretrained["ff"]]) - 0.02,
             min(1.0, max(ff_v + [pretrained["ff"]]) + 0.02)))):
        ox = k * (w + 20)

        def px(i, ox=ox, n=len(ys)):
            return ox + pad + i * (w - 2 * pad) / max(1, n - 1)

        def py(v, lo=lo, hi=hi):
            return h - pad - (v - lo) / (hi - lo) * (h - 2 * pad)

        parts.append(f'<text x="{ox + w / 2}" y="18" text-anchor="middle" font-size="12">'
                     f'{title}</text>')
        parts.append(f'<rect x="{ox + pad}" y="{pad}" width="{w - 2 * pad}" '
                     f'height="{h - 2 * pad}" fill="none" stroke="#999"/>')
        for v in np.linspace(lo, hi, 4):
            parts.append(f'<text x="{ox + pad - 4}" y="{py(v) + 4:.1f}" text-anchor="end" '
                         f'font-size="10">{v:.2f}</text>')
        parts.append(f'<line x1="{ox + pad}" x2="{ox + w - pad}" y1="{py(base):.1f}" '
                     f'y2="{py(base):.1f}" stroke="#888" stroke-dasharray="4 3"/>')
        pts = " ".join(f"{px(i):.1f},{py(v):.1f}" for i, v in enumerate(ys))
        parts.append(f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="2"/>')
        for i, (v, lab) in enumerate(zip(ys, labels)):
            parts.append(f'<circle cx="{px(i):.1f}" cy="{py(v):.1f}" r="3.5" fill="#1f77b4"/>')
            parts.append(f'<text x="{px(i):.1f}" y="{h - pad + 16}" text-anchor="middle" '
                         f'font-size="10">{lab}</text>')
            parts.append(f'<text x="{px(i) + 5:.1f}" y="{py(v) - 6:.1f}" font-size="9">'
                         f'{v:.3f}</text>')
    svg = (f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w + 20}" height="{h}" '
           f'font-family="sans-serif"><rect width="100%" height="100%" fill="white"/>'
           + "".join(parts) + "</svg>\n")
    path.write_text(svg)
    return path


def write_md(path: Path, body: str, label: str = "") -> None:
    text = path.read_text() if path.is_file() else "# Private training\n"
    begin, end = ((BEGIN, END) if not label else
                  (BEGIN.replace("results", f"results-{label}"),
                   END.replace("results", f"results-{label}")))
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        text = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, text,
                      flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def md_table(headers: list[str], rows: list[list]) -> str:
    def fmt(c):
        if isinstance(c, float):
            return "n/a" if c != c else f"{c:.3f}"
        return str(c)
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--quick", action="store_true",
                    help="a smoke test of a few minutes: 16 people, 1 epoch, 10 ORL people, "
                    "3 timing rounds (its figures mean little)")
    ap.add_argument("--people", type=int, default=None,
                    help="people of folds 1-4 in the attack, half members (default 128)")
    ap.add_argument("--epochs", type=int, default=None,
                    help="epochs of every fine-tune (default 16)")
    ap.add_argument("--epsilons", default="1,3,8", help="target epsilons of the private runs")
    ap.add_argument("--max-norm", type=float, default=None,
                    help="C of clip mode per_example (default: the mode's default)")
    ap.add_argument("--job", default="{}",
                    help="job fields (JSON) for every fine-tune, private and not, e.g. "
                    "'{\"freeze_stages\": 5}' (default: the jobs' defaults)")
    ap.add_argument("--baseline-job", default='{"freeze_stages": 4}',
                    help="job fields (JSON) for the non-private fine-tune only, after --job, "
                    "(default: the last residual stage trained too; '{}': the private jobs' "
                    "trainable layers)")
    ap.add_argument("--label", default="",
                    help="with --out-md: the name of a results section of its own (e.g. a "
                    "--job variant) beside the default one, and of its plot")
    ap.add_argument("--unit", choices=("person", "image"), default="person")
    ap.add_argument("--accountant", choices=("prv", "rdp"), default="prv")
    ap.add_argument("--rounds", type=int, default=None, help="timing rounds (default 10)")
    ap.add_argument("--seed", type=int, default=0, help="which people are members (and the "
                    "jobs' seed)")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads")
    ap.add_argument("--out-md", type=Path, nargs="?", const=DOC, default=None,
                    help=f"write the results between the markers of this file (default "
                    f"{DOC.relative_to(ROOT)}) and the plot beside it")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    people_n = args.people or (16 if args.quick else 128)
    epochs = args.epochs if args.epochs is not None else (1 if args.quick else 16)
    rounds = args.rounds or (3 if args.quick else 10)
    epsilons = [float(e) for e in args.epsilons.split(",")]
    t_start = time.perf_counter()
    header("privacy: DP-SGD's mechanism, accounting, membership inference, utility, cost")

    from facegrad.clipping.config import ClipPerExample
    from facegrad.data.store import FaceArrays
    from facegrad.recognition.models import PretrainedFace
    from facegrad.training.config import TrainConfig
    from facegrad.training.loop import pretrained_state, train

    c = args.max_norm or ClipPerExample.model_fields["max_norm"].default

    # --- data ----------------------------------------------------------------------------------
    pool = people_of_folds(args.data, [1, 2, 3, 4])
    rng = random.Random(args.seed)
    chosen = sorted(rng.sample(pool, people_n))
    rng.shuffle(chosen)
    if args.unit == "person":
        member_people, other_people = sorted(chosen[: people_n // 2]), sorted(
            chosen[people_n // 2:])
    else:
        member_people, other_people = sorted(chosen), []
    pairs = read_pairs(args.data, [5])
    test_files = sorted({f for rows in pairs.values() for _, _, a, b in rows for f in (a, b)})
    attack_people = sorted(member_people + other_people)
    attack_files = [f"{p}/{f.name}" for p in attack_people
                    for f in sorted((args.data / p).iterdir()) if f.suffix == ".jpg"]
    from testkit.harness import orl_folder

    orl = orl_folder() if ORL.is_dir() else {}
    if args.quick:
        orl = dict(list(orl.items())[:10])
    orl_files = [p for ps in orl.values() for p in ps]
    orl_owner = np.array([i for i, ps in enumerate(orl.values()) for _ in ps])
    chip = faces(args.data, attack_files + test_files, orl_files)
    found = [f for f in attack_files if chip[f] is not None]
    owner = np.array([attack_people.index(f.split("/")[0]) for f in found])
    if args.unit == "person":
        member = np.isin(owner, [attack_people.index(p) for p in member_people])
    else:  # half of each person's photos, seeded
        member = np.zeros(len(found), bool)
        r2 = np.random.default_rng(args.seed)
        for p in np.unique(owner):
            rows = np.flatnonzero(owner == p)
            member[r2.permutation(rows)[: len(rows) // 2]] = True
    attack_chips = np.stack([chip[f] for f in found])
    train_rows = np.flatnonzero(member)
    tr_people = sorted(set(owner[train_rows].tolist()))
    train_data = FaceArrays(attack_chips[train_rows],
                            np.searchsorted(tr_people, owner[train_rows]).astype(np.int64),
                            [attack_people[i] for i in tr_people])
    test_keys = [f for f in test_files if chip[f] is not None]
    print(f"data: {args.data}  unit {args.unit}  {len(member_people)} member people, "
          f"{len(other_people)} non-member people (folds 1-4, seed {args.seed}); "
          f"{int(member.sum())} member photos, {int((~member).sum())} non-member photos "
          f"({len(attack_files) - len(found)} with no face); utility: fold 5's "
          f"{', '.join(f'{k} {len(v)}' for k, v in pairs.items())} pairs, ORL "
          f"{len(orl)} people", flush=True)

    t0 = time.perf_counter()
    exact = exactness(train_data.images, train_data.labels, c)
    print(f"exactness checks in {time.perf_counter() - t0:.0f} s", flush=True)

    # --- frozen trunk, once -------------------------------------------------------------------
    t0 = time.perf_counter()
    reference = PretrainedFace(2)
    reference.backbone.load_state_dict(pretrained_state(pretrained_dir()))
    reference.eval()
    sets = {"attack": attack_chips, "cfp": np.stack([chip[f] for f in test_keys])}
    if orl_files:
        sets["orl"] = np.stack([chip[orl_key(p)] for p in orl_files])
    feats = {k: trunk_features(reference.backbone, v) for k, v in sets.items()}
    keys = {"cfp": test_keys}
    print(f"frozen trunk: {sum(len(v) for v in sets.values())} faces x 2 in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)

    # --- the fine-tunes ------------------------------------------------------------------------
    # fine_tuned_share 1: the weights as trained. The job's average with the pretrained network
    # is post-processing (it keeps any guarantee) and can only hide membership: the attack is
    # on what training itself left in the weights
    base = {"calibration_identities": 0, "val_fraction": 0, "seed": args.seed, "device": "cpu",
            "fine_tuned_share": 1.0}
    if epochs is not None:
        base["epochs"] = epochs
    base |= json.loads(args.job)
    runs = []
    for eps in epsilons:
        runs.append((f"eps={eps:g}", TrainConfig(**base, clip={
            "mode": "per_example", "max_norm": c}, privacy={
            "target_epsilon": eps, "delta": DELTA, "unit": args.unit,
            "accountant": args.accountant})))
    # the non-private job trains the private jobs' layers (their freeze_stages default)
    runs.insert(0, ("non-private", TrainConfig(
        **({"freeze_stages": runs[0][1].freeze_stages} | base | json.loads(args.baseline_job)))))
    if min(cfg.freeze_stages for _, cfg in runs) < 4:
        raise SystemExit("the descriptors here assume the first three residual stages frozen "
                         "(freeze_stages >= 4)")
    work = Path(tempfile.mkdtemp(prefix="privacy-bench-"))
    nets = [("pretrained", reference, None, None, 0.0)]
    for name, cfg in runs:
        t0 = time.perf_counter()
        trained = train(cfg, train_data, work / name.replace("=", ""),
                        pretrained_dir=pretrained_dir())
        secs = time.perf_counter() - t0
        trained.model.eval()
        rec = trained.privacy
        print(f"{name}: {cfg.epochs} epochs on {len(train_data.labels)} photos of "
              f"{len(train_data.names)} people in {secs:.0f} s"
              + (f"; sigma {rec['noise_multiplier']:.3f}, q {rec['sample_rate']:.4f}, "
                 f"{rec['steps_done']} steps, epsilon {rec['epsilon']:.3f}" if rec else ""),
              flush=True)
        nets.append((name, trained.model, rec, cfg, secs))

    # --- descriptors, attack, utility --------------------------------------------------------
    results = []
    base_scores = None
    for name, model, rec, cfg, secs in nets:
        diff = check_trunk(model, reference, sets["attack"], feats["attack"], name)
        desc = {k: descriptors(model.backbone, f) for k, f in feats.items()}
        if args.unit == "person":
            scores = attack_scores(desc["attack"], owner, np.ones(len(owner), bool))
        else:
            scores = attack_scores(desc["attack"], owner, member)
        if base_scores is None:
            base_scores = scores
        a_plain = auc(scores[member], scores[~member])
        cal = scores - base_scores
        a_cal = auc(cal[member], cal[~member]) if name != "pretrained" else float("nan")
        u = utility(desc, keys, pairs, orl_owner) if orl_files else utility(
            desc | {"orl": torch.zeros(0, 128)}, keys, pairs, np.zeros(0, int))
        results.append({"name": name, "rec": rec, "cfg": cfg, "secs": secs, "mia_plain": a_plain,
                        "mia_cal": a_cal,
                        "mia_auc": a_plain if a_cal != a_cal else max(a_plain, a_cal),
                        "diff": diff, **u})
    by = {r["name"]: r for r in results}

    # --- accounting, exactness, noise, cost -----------------------------------------------------
    acct = []
    for r in results:
        if r["rec"] is None:
            continue
        rec = r["rec"]
        theirs = dp_accounting_epsilon(rec["noise_multiplier"], rec["sample_rate"],
                                       rec["steps_done"], rec["delta"], rec["accountant"])
        acct.append([r["name"], rec["noise_multiplier"], rec["sample_rate"], rec["steps_done"],
                     rec["delta"], rec["epsilon"], theirs, rec["epsilon"] / theirs])
    t0 = time.perf_counter()
    priv_cfgs = [r for r in results if r["rec"] is not None]
    from facegrad.training import private

    eps8 = next((r for r in priv_cfgs if r["name"] == "eps=8"), priv_cfgs[-1])
    plan8 = private.plan(eps8["cfg"], *private.units_of(eps8["cfg"], train_data.labels))
    trainable = [p for p in next(m for n, m, *_ in nets if n == eps8["name"]).parameters()
                 if p.requires_grad]
    noise = noise_sd(plan8, trainable)
    print(f"noise check in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    # the normal step trains the private step's layers, whatever the non-private run trains
    normal = TrainConfig(**(base | {"freeze_stages": eps8["cfg"].freeze_stages}))
    cost = step_cost(normal, eps8["cfg"], train_data.images, train_data.labels, rounds)
    print(f"step cost: {cost['rounds']} rounds in {time.perf_counter() - t0:.0f} s", flush=True)

    # --- report --------------------------------------------------------------------------------
    t_exact = table(["model", "dtype", "unit", "C", "units", "max |diff| / max |grad|",
                     "max |diff|"],
                    [[a, d, b, cc, n, f"{rel:.1e}", f"{ab:.1e}"]
                     for a, d, b, cc, n, rel, ab in exact])
    t_acct = table(["run", "sigma", "q", "steps", "delta", "epsilon (ours)",
                    "epsilon (dp-accounting)", "ratio"],
                   [[a, f"{s:.4f}", f"{q:.4f}", n, f"{d:g}", f"{e1:.4f}", f"{e2:.4f}",
                     f"{rt:.4f}"] for a, s, q, n, d, e1, e2, rt in acct])
    res_rows = [[r["name"], ("-" if r["rec"] is None else f"{r['rec']['epsilon']:.2f}"),
                 ("-" if r["rec"] is None else f"{r['rec']['noise_multiplier']:.3f}"),
                 r["mia_plain"], r["mia_cal"], r["mia_auc"], r["ff"], r["fp"],
                 r.get("orl_tpir", float("nan")), r.get("orl_verify", float("nan")),
                 f"{r['secs']:.0f}"] for r in results]
    res_head = ["network", "epsilon", "sigma", "MIA AUC", "MIA AUC calibrated",
                "MIA AUC (stronger)", "FF acc", "FP acc", "ORL TPIR@FPIR.05",
                "ORL verify acc", "train s"]
    print("\n1. per-example clipping against a naive loop over units:")
    print(t_exact)
    print(f"noise: measured sd / (sigma C / expected units) = {noise:.4f} (sigma "
          f"{plan8.noise_multiplier:.3f}, C {plan8.max_norm:g}, expected units "
          f"{plan8.expected_units:.2f}, {sum(p.numel() for p in trainable)} coordinates)")
    print("\n2. epsilon against dp-accounting:")
    print(t_acct)
    print("\n3-4. membership inference and utility:")
    print(table(res_head, res_rows))
    print(f"\n5. step cost: DP step {cost['private_s']:.2f} s (of which per-unit clipping "
          f"{cost['clip_s']:.2f} s) vs normal step "
          f"{cost['normal_s']:.2f} s (medians; same Poisson samples, median "
          f"{cost['images_median']:.0f} images, mean {cost['images_mean']:.1f}); median ratio "
          f"{cost['ratio']:.2f} over {cost['rounds']} rounds")
    worst = max(acct, key=lambda a: abs(a[-1] - 1))
    eps_ratio = worst[-1]
    a8, anp = eps8["mia_auc"], by["non-private"]["mia_auc"]
    f8, fnp = eps8["ff"], by["non-private"]["ff"]
    max64 = max(e[5] for e in exact if e[1] == "float64")
    max32 = max(e[5] for e in exact if e[1] == "float32")
    bars = [
        ("per-example clipping equals the naive loop (float64: max rel. diff <= 1e-9; float32 "
         "rounding shown)", max64 <= 1e-9, f"{max64:.1e}; float32 {max32:.1e}"),
        ("noise sd = sigma C / expected units (within 1 %)", abs(noise - 1) <= 0.01,
         f"{noise:.4f}"),
        ("epsilon within 2 % of dp-accounting's", abs(eps_ratio - 1) <= 0.02,
         f"{eps_ratio:.4f}"),
        (f"MIA AUC at {eps8['name']} <= 0.60 and below the non-private model's",
         a8 <= 0.60 and a8 < anp, f"{a8:.3f} vs {anp:.3f}"),
        (f"FF at {eps8['name']} within 0.05 of the non-private fine-tune", abs(f8 - fnp) <= 0.05,
         f"{f8:.4f} vs {fnp:.4f}"),
        ("DP step <= 2.5x a normal step", cost["ratio"] <= 2.5, f"{cost['ratio']:.2f}"),
    ]
    print()
    for text, ok, val in bars:
        print(f"{verdict(ok):6s}  {text}: {val}")
    print(f"pretrained sanity check: MIA AUC {by['pretrained']['mia_plain']:.3f} (about 0.5 "
          f"expected: it trained on none of them)")
    elapsed = time.perf_counter() - t_start
    print(f"run time {elapsed / 60:.1f} min")
    footer()
    final = (f"eps_ratio={eps_ratio:.4f} mia_auc_eps8={a8:.4f} mia_auc_nonprivate={anp:.4f} "
             f"ff_eps8={f8:.4f} ff_nonprivate={fnp:.4f} step_cost={cost['ratio']:.2f}")

    if args.out_md:
        suffix = f"-{args.label}" if args.label else ""
        plot = write_plot(args.out_md.parent / f"privacy-results{suffix}", results,
                          by["pretrained"])
        cmd = "python bench/privacy.py" + "".join(
            f" {a}" for a in __import__("sys").argv[1:])
        label = ("**quick configuration**: a smoke test of 1 epoch on 16 people, its figures "
                 "mean little" if args.quick else "the default configuration")
        body = "\n".join([
            "## Results" + (f": {args.label}" if args.label else ""),
            "",
            f"Generated by `{cmd}` ({label}); do not edit by hand.",
            "",
            f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}; code: {code_state()}; machine: "
            f"{cpu_model()} x{__import__('os').cpu_count()}, torch threads "
            f"{torch.get_num_threads()}, CPU; load average at the end {loadavg()}; run time "
            f"{elapsed / 60:.1f} min",
            f"- attack set: unit {args.unit}, {len(member_people)} member and "
            f"{len(other_people)} non-member people of CFP folds 1-4 (seed {args.seed}); "
            f"{int(member.sum())} member and {int((~member).sum())} non-member photos; every "
            f"fine-tune: {runs[0][1].epochs} epochs, batch {runs[0][1].batch_size}, "
            f"learning rate {runs[0][1].learning_rate:g}, seed {args.seed}; "
            f"job fields {args.job}; "
            f"private: freeze_stages {eps8['cfg'].freeze_stages}, clip per_example C = "
            f"{c:g}, delta {DELTA:g}, accountant {args.accountant}; non-private: "
            f"freeze_stages {runs[0][1].freeze_stages}, clip {runs[0][1].clip.mode} "
            f"{runs[0][1].clip.max_norm:g}, head imprinted (fields {args.baseline_job})",
            f"- utility on people in neither half: CFP fold 5 ("
            f"{', '.join(f'{k} {len(v)}' for k, v in pairs.items())} pairs), "
            f"ORL {len(orl)} people among themselves",
            "",
            "Membership inference and utility (MIA AUC: members' vs non-members' photos; "
            "'stronger' is the higher of the plain and the pretrained-calibrated attack, the "
            "figure the bars read):",
            "",
            md_table(res_head, res_rows),
            "",
            f"![membership-inference AUC and FF accuracy against epsilon]({plot.name})",
            "",
            "Epsilon against Google's dp-accounting (same sigma, q, steps, delta):",
            "",
            md_table(["run", "sigma", "q", "steps", "delta", "epsilon (ours)",
                      "epsilon (dp-accounting)", "ratio"],
                     [[a, f"{s:.4f}", f"{q:.4f}", n, f"{d:g}", f"{e1:.4f}", f"{e2:.4f}",
                       f"{rt:.4f}"] for a, s, q, n, d, e1, e2, rt in acct]),
            "",
            "Per-example clipping against a naive loop over units (autograd, one unit at a "
            "time):",
            "",
            md_table(["model", "dtype", "unit", "C", "units", "max abs diff / max abs grad",
                      "max abs diff"],
                     [[a, d, b, cc, n, f"{rel:.1e}", f"{ab:.1e}"]
                      for a, d, b, cc, n, rel, ab in exact]),
            "",
            f"Noise: measured sd of the averaged gradient for zero gradients / (sigma C / "
            f"expected units) = {noise:.4f} (sigma {plan8.noise_multiplier:.3f}, C "
            f"{plan8.max_norm:g}, expected units {plan8.expected_units:.2f}).",
            "",
            f"Step cost: a DP step {cost['private_s']:.2f} s (of which per-unit clipping, "
            f"`accumulate`, {cost['clip_s']:.2f} s) vs a normal step "
            f"{cost['normal_s']:.2f} s on the same Poisson samples (median "
            f"{cost['images_median']:.0f} images), same trainable layers; median ratio "
            f"{cost['ratio']:.2f} over {cost['rounds']} rounds.",
            "",
            "Bars:",
            "",
            *[f"- {verdict(ok)}: {text} ({val})" for text, ok, val in bars],
            f"- pretrained network's MIA AUC (sanity check, about 0.5 expected): "
            f"{by['pretrained']['mia_plain']:.3f}",
            "",
            "```",
            final,
            "```",
        ])
        write_md(args.out_md, body, args.label)
        print(f"wrote {args.out_md} and {plot}")
    print(final)


if __name__ == "__main__":
    main()
