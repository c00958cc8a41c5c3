"""Fine-tuning's gain on people no job saw, fold by fold: each CFP fold in turn is the test, the
other four folds' people are the job's.

    .venv/bin/python bench/finetune_rotation.py [--data ../shared/data/cfp_dev] [--folds 1-5]
        [--test 5] [--chips chips.npz] [--settings '[{}, {"epochs": 8}]']
        [--md docs/clipping-study.md]

A single test fold tells little about a gain of a point or two: fold 5's pretrained
frontal-profile (FP) accuracy is 0.83 where folds 1-4 give 0.88-0.89, and one fold's 700 pairs
carry a sampling error of about ±0.014. Rotating the test fold measures every person once as a
stranger, and the gain (fine-tuned minus pretrained, on the same pairs) is paired, so its spread
over the folds is the spread of the gain itself, not of how hard each fold's people are.

For each setting (a default job, ``TrainConfig()``, with some fields changed) and each fold k:
the job runs on the other folds' people by its own steps (:mod:`facegrad.pipeline`: train,
gallery, choose the network, choose the descriptor; it holds a fifth of them out and judges on
them), then fold k's FP and frontal-frontal (FF) pairs are scored with the pretrained network,
with the fine-tuned one (both with the job's first descriptor: flip_mean for 'auto'), and with
the network and descriptor the job kept (what a user of the service gets). Accuracy is the
protocol's: the threshold is chosen on the fold's own pairs.

Last line: ``finetune_rotation: <setting>: fp=M±S fp_gain=M±S ff_gain=M±S kept=N/F fused=N``
per setting (the served model's FP accuracy and gains, mean ± sd over the folds).
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

from _common import code_state, cpu_model, footer, header, loadavg, table, write_doc_section
from finetune_sweep import fusion_of, label, load_chips, pair_figures
from verification import (
    DATA,
    folds_arg,
    people_of_folds,
    protocol_files,
    read_pairs,
    train_folder,
)

import numpy as np  # isort: skip
import torch  # isort: skip

SECTION = "## Fine-tuning's gain fold by fold (CFP), written by bench/finetune_rotation.py"


def mean_sd(xs: list[float], signed: bool = True) -> str:
    sd = statistics.stdev(xs) if len(xs) > 1 else 0
    return f"{statistics.mean(xs):{'+' if signed else ''}.4f} ± {sd:.4f}"


def main() -> None:
    from facegrad.pipeline import build_gallery, choose_descriptor, choose_network
    from facegrad.recognition.architectures import architecture
    from facegrad.recognition.gallery import embed
    from facegrad.training.config import TrainConfig
    from facegrad.training.loop import pretrained_state, train

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--folds", type=folds_arg, default=folds_arg("1-5"),
                    help="the folds whose people take part (default 1-5)")
    ap.add_argument("--test", type=folds_arg,
                    help="which of them are the test in turn (default: each of them)")
    ap.add_argument("--chips", type=Path, help="keep the aligned chips in this .npz file")
    ap.add_argument("--settings", default="[{}]", help="JSON list of job overrides")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--md", type=Path, help="write the doc section into this markdown file")
    args = ap.parse_args()
    t_start, started = time.perf_counter(), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if not args.data.is_dir():
        raise SystemExit(f"no pair data at {args.data}")
    settings = json.loads(args.settings)
    tests = args.test or args.folds
    if not set(tests) <= set(args.folds) or len(args.folds) < 2:
        raise SystemExit("--test must name folds among --folds, and --folds at least two")
    header("finetune_rotation: fine-tuning's gain on each fold's people, the job on the rest")
    people = {k: people_of_folds(args.data, [k]) for k in args.folds}
    files = sorted(f"{p}/{f.name}" for ps in people.values() for p in ps
                   for f in (args.data / p).iterdir())
    chips = load_chips(args.chips, args.data, files)
    work = Path(tempfile.mkdtemp(prefix="finetune-rotation-"))
    pretrained_dir = work / "pretrained"

    def describe(cfg: TrainConfig, net: torch.nn.Module, device, test: list[str],
                 descriptor: str, fusion=None) -> dict:
        found = [f for f in test if chips[f] is not None]
        emb = embed(net, np.stack([chips[f] for f in found]), cfg.image_size, device,
                    normalisation=architecture(cfg.architecture).normalisation,
                    descriptor=descriptor, fusion=fusion).numpy()
        return {f: emb[i] for i, f in enumerate(found)}

    pre_figs: dict[int, dict] = {}
    rows, summary = [], {}
    for overrides in settings:
        name = label(overrides)
        gains, kept_tuned, fused, served_fp = {"FP": [], "FF": []}, 0, 0, []
        for k in tests:
            cfg = TrainConfig(**({"device": args.device} | overrides))
            pairs = read_pairs(args.data, [k])
            test, _ = protocol_files(args.data, pairs, [])
            train_people = [p for j in args.folds if j != k for p in people[j]]
            t0 = time.perf_counter()
            trained = train(cfg, train_folder(args.data, train_people, chips),
                            work / f"{name}-{k}".replace(" ", "_"), pretrained_dir=pretrained_dir)
            secs = time.perf_counter() - t0
            # the job's steps after training, as facegrad.pipeline runs them; the fine-tuned
            # network is scored before the choice, which may put the pretrained weights back
            gallery = build_gallery(cfg, trained)
            desc = gallery.descriptor  # the job's named descriptor ('auto': flip_mean first)
            tuned = pair_figures(pairs, describe(cfg, trained.model, trained.device, test, desc,
                                                 gallery.fusion))
            chosen, judged = choose_network(cfg, trained, gallery, pretrained_dir)
            kept = judged["kept"] if judged else "fine_tuned"
            served_gallery, choice = choose_descriptor(cfg, trained, chosen)
            if served_gallery.descriptor != desc:  # the job took the fused descriptor
                served = pair_figures(pairs, describe(
                    cfg, trained.model, trained.device, test, served_gallery.descriptor,
                    served_gallery.fusion))
            else:
                served = None
            if k not in pre_figs:
                trained.model.backbone.load_state_dict(pretrained_state(pretrained_dir))
                pre_figs[k] = pair_figures(pairs, describe(cfg, trained.model, trained.device,
                                                           test, desc, fusion_of(cfg, trained)))
            served = served or (tuned if kept == "fine_tuned" else pre_figs[k])
            kept_tuned += kept == "fine_tuned"
            fused += served_gallery.descriptor == "fused" and desc != "fused"
            served_fp.append(served["FP"]["accuracy"])
            for kind in gains:
                gains[kind].append(served[kind]["accuracy"] - pre_figs[k][kind]["accuracy"])
            rows.append([name, k, len(train_people),
                         *(f"{pre_figs[k][t]['accuracy']:.4f}" for t in ("FP", "FF")),
                         *(f"{tuned[t]['accuracy']:.4f}" for t in ("FP", "FF")), kept,
                         served_gallery.descriptor,
                         *(f"{served[t]['accuracy']:.4f}" for t in ("FP", "FF")),
                         *(f"{served[t]['accuracy'] - pre_figs[k][t]['accuracy']:+.4f}"
                           for t in ("FP", "FF")), f"{secs:.0f}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
        summary[name] = gains | {"kept": kept_tuned, "fused": fused, "served_fp": served_fp}
    heads = ["setting", "test fold", "job's people", "pretrained FP", "pretrained FF",
             "fine-tuned FP", "fine-tuned FF", "kept", "descriptor", "served FP", "served FF",
             "served FP gain", "served FF gain", "train s"]
    print()
    print(table(heads, rows))
    pre_fp = [pre_figs[k]["FP"]["accuracy"] for k in tests]
    lines = [f"pretrained FP over the folds: {mean_sd(pre_fp, signed=False)} (mean ± sd)"]
    for name, s in summary.items():
        lines.append(f"{name}: served FP {mean_sd(s['served_fp'], signed=False)}, served FP "
                     f"gain {mean_sd(s['FP'])}, FF gain {mean_sd(s['FF'])}, fine-tuned network "
                     f"kept in {s['kept']} of {len(tests)} folds, fused descriptor chosen in "
                     f"{s['fused']}")
    print("\n".join(lines))
    footer()
    if args.md:
        md = [SECTION, "",
              f"- command: `python bench/finetune_rotation.py {shlex.join(sys.argv[1:])}`",
              f"- code: {code_state()}; date: {started}; wall time "
              f"{(time.perf_counter() - t_start) / 60:.1f} min",
              f"- machine: {cpu_model()}, {os.cpu_count()} cores; torch {torch.__version__}; "
              f"load average at the end {loadavg()}",
              f"- data: {args.data.name}; for each test fold, the job runs on the other folds' "
              "people (it holds a fifth of them out and judges on them); the test fold's pairs "
              "(FP 700, FF 700) are people in no job. Served: the network and the descriptor the "
              "job kept (descriptor 'auto': flip_mean or fused, chosen on its held-out people). "
              "Gains are the served model's accuracy minus the pretrained network's (dlib, "
              "flip_mean, or the job's named descriptor) on the same pairs", "",
              "| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
        md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        md += ["", *(f"- {line}" for line in lines), ""]
        write_doc_section(args.md, SECTION, md)
        print(f"wrote the section {SECTION!r} of {args.md}")
    for name, s in summary.items():
        print(f"finetune_rotation: {name.replace(' ', '_')}: "
              f"fp={mean_sd(s['served_fp'], signed=False)} fp_gain={mean_sd(s['FP'])} "
              f"ff_gain={mean_sd(s['FF'])} kept={s['kept']}/{len(tests)} "
              f"fused={s['fused']}".replace(" ± ", "±"))


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    main()
