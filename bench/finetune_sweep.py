"""A sweep of fine-tuning settings on turned faces: chosen by the job's own judgement, confirmed
on people no job saw.

    .venv/bin/python bench/finetune_sweep.py [--data ../shared/data/cfp_dev] [--train-folds 1-4]
        [--test-folds 5] [--chips chips.npz] [--settings '[{"clip": {"mode": "none"}}, ...]']

Each setting is a default job (``TrainConfig()``) with some fields changed, run on the train
folds' people by the job's own steps (:mod:`facegrad.pipeline`: train, gallery, choose): the job
holds a fifth of its people out of training and judges the fine-tuned network against the
pretrained one on them (:func:`facegrad.recognition.open_set.among_themselves`: TPIR at FPIR
0.05, verification accuracy and TAR at FAR 0.01 over every pair of their photos, frontal and
profile alike). That judgement is what a user of the service sees, and it is what the sweep
ranks by (the mean of the three gains). The test folds' people are in no job: their
frontal-profile (FP) and frontal-frontal (FF) pairs are scored with the fine-tuned network
whether or not the job kept it, beside the pretrained network, as the confirmation.

Photos are detected and aligned once (``facegrad.recognition.detect.crop_one``, as upload does);
``--chips`` keeps the chips in a file for the next run (it is only read back when it was made
from the same photos).

Last line: ``finetune_sweep: best=<label> judged_gain=G fp_gain=F ff_gain=E`` (the setting the
job's judgement ranks first; its fold-level FP and FF accuracy minus the pretrained network's).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import CFP_SECTION, code_state, footer, header, loadavg, table, write_doc_section
from verification import (
    chips_of,
    pair_data_args,
    people_of_folds,
    protocol,
    protocol_files,
    read_pairs,
    score_pairs,
    train_folder,
)

import numpy as np  # isort: skip
import torch  # isort: skip

# the service's knobs that the issue names and a job can set: the clipping rule (the origin
# document's value and threshold rules, Keras-style norm, AGC, AutoClip), how much of the
# network learns and how fast, augmentation, and how much of the fine-tuned weights the model
# keeps (the rest is the pretrained network's: WiSE-FT)
SETTINGS: list[dict] = [
    {},
    {"clip": {"mode": "none"}},
    {"clip": {"mode": "value", "clip_value": 1.0}},
    {"clip": {"mode": "norm", "max_norm": 5.0, "scope": "per_tensor"}},
    {"clip": {"mode": "threshold", "alpha": 0.9}},
    {"clip": {"mode": "agc"}},
    {"clip": {"mode": "autoclip"}},
    {"freeze_stages": 4},
    {"freeze_stages": 0, "backbone_lr_scale": 0.03},
    {"learning_rate": 0.003},
    {"learning_rate": 0.03},
    {"epochs": 4},
    {"augment": False},
    {"fine_tuned_share": 1.0},
    {"epochs": 4, "fine_tuned_share": 1.0},
]


def label(overrides: dict) -> str:
    if not overrides:
        return "default"
    parts = []
    for k, v in overrides.items():
        if k == "clip":
            parts.append("clip " + " ".join(f"{x}" if n == "mode" else f"{n}={x}"
                                            for n, x in v.items()))
        else:
            parts.append(f"{k}={v}")
    return ", ".join(parts)


def load_chips(path: Path | None, data: Path, files: list[str]) -> dict[str, np.ndarray | None]:
    """{file: chip or None}: from ``path`` when it holds exactly these files, else detected and
    aligned now (and written to ``path``)."""
    if path is not None and path.is_file():
        with np.load(path, allow_pickle=False) as z:  # each z[key] reads the file again
            names, found, stack = [str(n) for n in z["files"]], z["found"], z["chips"]
        if sorted(names) == sorted(files):
            rows = {str(n): i for i, n in enumerate(found)}
            print(f"chips: read {len(rows)} of {len(files)} from {path}", flush=True)
            return {f: (stack[rows[f]] if f in rows else None) for f in files}
    t0 = time.perf_counter()
    chips = chips_of(data, files)
    found = [f for f in files if chips[f] is not None]
    print(f"detect + align: {len(files)} photos in {time.perf_counter() - t0:.0f} s, "
          f"{len(files) - len(found)} with no face", flush=True)
    if path is not None:
        np.savez(path, files=np.array(files), found=np.array(found),
                 chips=np.stack([chips[f] for f in found]))
    return chips


def fusion_of(cfg, trained):
    """How the fused descriptor puts the job's network as it is now beside SFace, measured on
    the job's images as the job does (:func:`facegrad.pipeline.build_gallery`); None for the
    other descriptors."""
    from facegrad.pipeline import build_gallery

    return build_gallery(cfg, trained).fusion if cfg.descriptor == "fused" else None


def pair_figures(pairs, desc: dict, threshold: float | None = None) -> dict[str, dict]:
    """Per pair kind, the protocol's figures (:func:`verification.protocol`; with
    ``threshold``, the accuracy at it too)."""
    out = {}
    for kind, kp in pairs.items():
        scored, refused = score_pairs(kp, desc, lambda a, b: float(a @ b))
        out[kind] = protocol(scored, threshold) | {"refused": refused}
    return out


def main() -> None:
    from facegrad.pipeline import build_gallery, choose_network
    from facegrad.recognition.architectures import architecture
    from facegrad.recognition.gallery import embed
    from facegrad.recognition.open_set import JUDGED
    from facegrad.training.config import TrainConfig
    from facegrad.training.loop import pretrained_state, train

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    pair_data_args(ap)
    ap.add_argument("--chips", type=Path, help="keep the aligned chips in this .npz file")
    ap.add_argument("--settings", help="JSON list of job overrides (default: the built-in list)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--md", type=Path, help="write the doc section into this markdown file "
                    "(docs/clipping-study.md), replacing it where it is there")
    args = ap.parse_args()
    t_start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if not args.data.is_dir():
        raise SystemExit(f"no pair data at {args.data}")
    settings = json.loads(args.settings) if args.settings else SETTINGS
    header("finetune_sweep: fine-tuning settings judged by the job, confirmed on unseen people")
    pairs = read_pairs(args.data, args.test_folds)
    train_people = people_of_folds(args.data, args.train_folds)
    test_files, files = protocol_files(args.data, pairs, train_people)
    print(f"data: {args.data}  train folds {args.train_folds} ({len(train_people)} people)  "
          f"test folds {args.test_folds}  pairs: "
          f"{', '.join(f'{k} {len(v)}' for k, v in pairs.items())}", flush=True)
    chips = load_chips(args.chips, args.data, files)
    found = [f for f in test_files if chips[f] is not None]
    stack = np.stack([chips[f] for f in found])
    data = train_folder(args.data, train_people, chips)
    work = Path(tempfile.mkdtemp(prefix="finetune-sweep-"))
    pretrained_dir = work / "pretrained"

    def describe(cfg: TrainConfig, net: torch.nn.Module, device: torch.device,
                 descriptor: str, fusion=None) -> dict:
        emb = embed(net, stack, cfg.image_size, device,
                    normalisation=architecture(cfg.architecture).normalisation,
                    descriptor=descriptor, fusion=fusion).numpy()
        return {f: emb[i] for i, f in enumerate(found)}

    results = []
    pre_figs = None
    for i, overrides in enumerate(settings):
        cfg = TrainConfig(**({"device": args.device} | overrides))
        t0 = time.perf_counter()
        trained = train(cfg, data, work / f"run{i}", pretrained_dir=pretrained_dir)
        secs = time.perf_counter() - t0
        gallery = build_gallery(cfg, trained)
        # networks compared with the job's first descriptor ('auto': flip_mean)
        tuned_figs = pair_figures(pairs, describe(cfg, trained.model, trained.device,
                                                  gallery.descriptor, gallery.fusion))
        _, judged, _ = choose_network(cfg, trained, gallery, pretrained_dir)
        if pre_figs is None:  # the pretrained network, as choose_network left it
            trained.model.backbone.load_state_dict(pretrained_state(pretrained_dir))
            pre_figs = pair_figures(pairs, describe(cfg, trained.model, trained.device,
                                                    gallery.descriptor, fusion_of(cfg, trained)))
        last = trained.history[-1]
        gain = statistics.mean(judged["gain"][k] for k in JUDGED)
        results.append((label(overrides), judged, gain, tuned_figs, last, trained.clipping, secs))
        print(f"{label(overrides)}: {secs:.0f} s; judged gain {gain:+.4f} "
              f"({json.dumps(judged['gain'])}), kept {judged['kept']}; "
              + "; ".join(f"{k} {v['accuracy']:.4f}" for k, v in tuned_figs.items()),
              flush=True)

    kinds = sorted(pairs)
    ranked = sorted(results, key=lambda r: -r[2])
    print()
    print("pretrained network on the test folds: " + ", ".join(
        f"{k} {pre_figs[k]['accuracy']:.4f} (TAR@FAR1e-2 {pre_figs[k]['tar_far_0.01']:.4f}, "
        f"refused {pre_figs[k]['refused']})" for k in kinds))
    print()
    heads, rows = result_rows(ranked, pre_figs, kinds)
    print(table(heads, rows))
    footer()
    best = ranked[0]
    fp = "FP" if "FP" in kinds else kinds[0]
    ff = "FF" if "FF" in kinds else kinds[-1]
    if args.md:
        write_doc_section(args.md, CFP_SECTION, markdown(
            args, started, time.perf_counter() - t_start, len(train_people), data, pairs,
            pre_figs, ranked, heads, rows, fp, ff))
        print(f"wrote the section {CFP_SECTION!r} of {args.md}")
    print(f"finetune_sweep: best={best[0].replace(' ', '_')} judged_gain={best[2]:.4f} "
          f"fp_gain={best[3][fp]['accuracy'] - pre_figs[fp]['accuracy']:.4f} "
          f"ff_gain={best[3][ff]['accuracy'] - pre_figs[ff]['accuracy']:.4f}")


def result_rows(ranked, pre_figs, kinds) -> tuple[list[str], list[list]]:
    from facegrad.recognition.open_set import JUDGED

    rows = []
    for name, judged, gain, figs, last, clipping, secs in ranked:
        t, p = judged["fine_tuned"], judged["pretrained"]
        rows.append([name, f"{gain:+.4f}",
                     *(f"{t[k]:.3f} ({t[k] - p[k]:+.3f})" for k in JUDGED),
                     judged["kept"],
                     *(f"{figs[k]['accuracy']:.4f} "
                       f"({figs[k]['accuracy'] - pre_figs[k]['accuracy']:+.4f})" for k in kinds),
                     f"{last.get('train_acc', float('nan')):.3f}",
                     f"{clipping.get('clip_fraction') or 0:.2f}",
                     "{mean:.0f} / {max:.0f}".format(**clipping["grad_norm_pre"])
                     if clipping.get("grad_norm_pre") else "-", f"{secs:.0f}"])
    heads = ["setting", "judged gain", "held-out TPIR", "held-out verify", "held-out TAR",
             "kept", *(f"test {k}" for k in kinds), "train acc", "clipped",
             "grad norm mean / max", "train s"]
    return heads, rows


def markdown(args, started: str, wall: float, n_people: int, data, pairs, pre_figs, ranked,
             heads, rows, fp: str, ff: str) -> list[str]:
    """The doc section: what ran, the table, and sentences written from the numbers."""
    from _common import cpu_model

    def acc(figs, k):
        return figs[k]["accuracy"]

    n_held = len(ranked[0][1]["held_out"])
    default = next((r for r in ranked if r[0] == "default"), None)
    clip_rows = [r for r in ranked if r[0] == "default" or r[0].startswith("clip ")]
    kept = [r[0] for r in ranked if r[1]["kept"] == "fine_tuned"]
    best, top_fp = ranked[0], max(ranked, key=lambda r: acc(r[3], fp))
    bar_fp = max(0.90, acc(pre_figs, fp) + 0.05)
    counts = ", ".join(f"{k} {len(v)}" for k, v in pairs.items())
    md = [CFP_SECTION, "",
          f"- command: `python bench/finetune_sweep.py {shlex.join(sys.argv[1:])}` "
          "(the library, the job's own steps; no server)",
          f"- code: {code_state()}; date: {started}; wall time {wall / 60:.1f} min",
          f"- machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"load average at the end {loadavg()}",
          f"- data: {args.data.name}, the people of fold(s) "
          f"{', '.join(map(str, args.train_folds))} ({n_people} people, "
          f"{len(data.labels)} photos with a face) for every job, which holds {n_held} of them "
          f"out of training and judges on them; the pairs of fold(s) "
          f"{', '.join(map(str, args.test_folds))} ({counts}; "
          "people in no job) as the confirmation, scored with each job's fine-tuned network "
          "whether or not the job kept it (one test fold: the protocol's threshold is chosen on "
          "the fold itself)",
          "- every setting is the default job (`TrainConfig()`: 8 epochs, SGD lr 0.01 with the "
          "backbone at 0.1x, stages 0-1 frozen, CosFace head, augmentation, clip norm 5 "
          "global, flip_mean, the weights then averaged half and half with the pretrained ones: "
          "fine_tuned_share 0.5) with the fields named changed; the fine-tuned network is that "
          "average, and fine_tuned_share 1 is the network as trained",
          "",
          f"Pretrained network on the test pairs: {fp} {acc(pre_figs, fp):.4f}, "
          f"{ff} {acc(pre_figs, ff):.4f}.", "",
          "Ranked by the job's judgement (the mean of the held-out people's gains in TPIR at "
          "FPIR 0.05, verification accuracy and TAR at FAR 0.01; in brackets, the change from "
          "the pretrained network):", "",
          "| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
    md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    md += ["", "What the numbers say:", ""]
    md.append(f"- The job's judgement ranks **{best[0]}** first (mean gain {best[2]:+.4f}); "
              f"the job kept the fine-tuned network in {len(kept)} of {len(ranked)} settings"
              + (f" ({', '.join(kept)})." if kept else "."))
    md.append(f"- On the test pairs, {best[0]} gives {fp} {acc(best[3], fp):.4f} "
              f"({acc(best[3], fp) - acc(pre_figs, fp):+.4f}) and {ff} {acc(best[3], ff):.4f} "
              f"({acc(best[3], ff) - acc(pre_figs, ff):+.4f}); the best {fp} of any setting is "
              f"{top_fp[0]}'s, {acc(top_fp[3], fp):.4f} "
              f"({acc(top_fp[3], fp) - acc(pre_figs, fp):+.4f}), ranked "
              f"{ranked.index(top_fp) + 1} of {len(ranked)} by the judgement.")
    met = [r[0] for r in ranked if acc(r[3], fp) >= bar_fp and acc(r[3], ff) >= 0.99]
    md.append(f"- The issue's bar ({fp} >= 0.90 and >= the pretrained network's + 0.05, here "
              f">= {bar_fp:.4f}, with {ff} >= 0.99): "
              + (f"met by {', '.join(met)}." if met else "met by no setting."))
    if default is not None and len(clip_rows) > 1:
        order = ", ".join(f"{r[0]} {r[2]:+.4f}" for r in clip_rows)
        md.append(f"- Clipping rules at the default rate, by the judgement: {order}. "
                  f"The default job's rule is clip norm 5 global; the sweep "
                  + ("favours it." if clip_rows[0] is default else
                     f"ranks {clip_rows[0][0]} above it ({clip_rows[0][2]:+.4f} vs "
                     f"{default[2]:+.4f})."))
        norms = default[5].get("grad_norm_pre")
        if norms:
            md.append(f"- The default job's gradient norm before clipping: mean "
                      f"{norms['mean']:.0f}, max {norms['max']:.0f}, against its cap of 5: the "
                      f"rule scales every step "
                      f"it clips ({default[5].get('clip_fraction', 0):.0%} of them) to that norm.")
        diverged = [r[0] for r in ranked if r[4].get("train_acc", 1) < 0.2]
        if diverged:
            md.append(f"- Training that learnt nothing (train accuracy below 0.2): "
                      f"{', '.join(diverged)}.")
    md.append("")
    return md


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
