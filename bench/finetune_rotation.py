"""Fine-tuning's gain on people no job saw, fold by fold: each CFP fold in turn is the test, the
other four folds' people are the job's.

    .venv/bin/python bench/finetune_rotation.py [--data ../shared/data/cfp_dev] [--folds 1-5]
        [--test 5] [--chips chips.npz] [--settings '[{}, {"epochs": 8}]']
        [--md docs/clipping-study.md] [--fusion-rules --confirm 5]

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
protocol's: the threshold is chosen on the fold's own pairs; the served model is also measured at
its own verification threshold (the job's calibration step, :func:`facegrad.pipeline.calibrate`).
Where the job serves the fused descriptor after fine-tuning, fold k's pairs are also scored
with the network it did not keep beside SFace (the fusion fitted on the job's photos as the job
fits it): "fused: pretrained FP" and "fused: fine-tuned FP" are what fine-tuning changes in the
descriptor the model serves, which the job judges on its held-out people
(:func:`facegrad.pipeline.choose_descriptor`).

``--fusion-rules``: where the job served the fused descriptor, the test fold's pairs are also
scored with other rules for putting its two networks' cosines together (the job's own:
z-score normalisation and the sum rule, :func:`facegrad.recognition.gallery.fit_fusion`, fitted
on all its photos): each network alone, equal weights, and the z-scores weighted by each
network's accuracy on the job's held-out people (matcher weighting, Snelick et al. 2005: by
1 / the error of its best threshold, or by its d', the separation of its same- and
different-person scores in pooled standard deviations). With ``--confirm K``
the rule is chosen on the other test folds' mean and fold K confirms it.

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


FUSION_RULES = ("z-score sum (the job's)", "error-weighted", "d'-weighted", "equal weights",
                "dlib alone", "SFace alone")


def fusion_rule_figures(pairs, served_desc: dict, served: dict, gallery,
                        held: np.ndarray) -> dict:
    """{rule: {pair kind: the protocol's accuracy}} of the test pairs (``served_desc``: their
    fused descriptors as the job serves them, ``served``: their figures, the job's rule), each
    other rule weighed on the held-out people."""
    from facegrad.recognition.gallery import fused_parts
    from facegrad.recognition.open_set import _best_cut, pair_scores

    rows = torch.nonzero(torch.isin(gallery.owner, torch.from_numpy(held))).view(-1)
    parts = fused_parts(gallery.emb[rows])
    stats = []  # per network: (sd of different-person scores, error of the best cut, d')
    for part in parts:
        sims, same = pair_scores(part, gallery.owner[rows])
        g, d = sims[same], sims[~same]
        _, balanced, _ = _best_cut(sims, same)
        stats.append((float(d.std()), max(1 - balanced, 1e-4),
                      float((g.mean() - d.mean()) / ((g.var() + d.var()) / 2) ** 0.5)))
    weights = {"error-weighted": [1 / (sd * err) for sd, err, _ in stats],
               "d'-weighted": [dp / sd for sd, _, dp in stats],
               "equal weights": [1.0, 1.0], "dlib alone": [1.0, 0.0], "SFace alone": [0.0, 1.0]}
    files = sorted(served_desc)
    first, second = (p.numpy() for p in fused_parts(
        torch.from_numpy(np.stack([served_desc[f] for f in files]))))
    out = {FUSION_RULES[0]: {kind: f["accuracy"] for kind, f in served.items()}}
    for rule, (a, b) in weights.items():
        mixed = np.hstack([first * a ** 0.5, second * b ** 0.5])  # cosine: a·dlib's + b·SFace's
        desc = {f: mixed[i] for i, f in enumerate(files)}
        out[rule] = {kind: f["accuracy"] for kind, f in pair_figures(pairs, desc).items()}
    return out


def rule_table(rule_figs: dict[int, dict], confirm: int | None) -> list[str]:
    """Markdown lines: per rule, FP (FF) accuracy per fold; with ``confirm``, the rule with the
    best mean FP over the other folds and its figure on fold ``confirm``."""
    folds = sorted(rule_figs)
    choose = [k for k in folds if k != confirm]
    heads = ["rule", *(f"fold {k}" for k in folds)]
    if choose and confirm in rule_figs:
        heads.append(f"mean FP, folds {', '.join(map(str, choose))}")
    out = ["| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
    means = {}
    for rule in FUSION_RULES:
        cells = [f"{rule_figs[k][rule]['FP']:.4f} ({rule_figs[k][rule]['FF']:.4f})"
                 for k in folds]
        if len(heads) > len(folds) + 1:
            means[rule] = statistics.mean(rule_figs[k][rule]["FP"] for k in choose)
            cells.append(f"{means[rule]:.4f}")
        out.append("| " + " | ".join([rule, *cells]) + " |")
    if means:
        pick = max(means, key=means.get)
        out += ["", f"Chosen on folds {', '.join(map(str, choose))}: {pick} (mean FP "
                    f"{means[pick]:.4f}); on fold {confirm} it gives FP "
                    f"{rule_figs[confirm][pick]['FP']:.4f}, the job's rule "
                    f"{rule_figs[confirm][FUSION_RULES[0]]['FP']:.4f}."]
    return out


def main() -> None:
    from facegrad.pipeline import (
        build_gallery,
        calibrate,
        choose_descriptor,
        choose_network,
        refit_second_network,
        tune_second_network,
    )
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
    ap.add_argument("--fusion-rules", action="store_true",
                    help="also score fused models' pairs with other fusion rules")
    ap.add_argument("--confirm", type=int,
                    help="with --fusion-rules: the fold that confirms the rule chosen on the rest")
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
    pre_desc: dict[int, dict] = {}
    rule_figs: dict[int, dict] = {}  # --fusion-rules: {fold: {rule: {kind: accuracy}}}
    rows, summary = [], {}
    for overrides in settings:
        name = label(overrides)
        gains, kept_tuned, fused, served_fp = {"FP": [], "FF": []}, 0, 0, []
        at_own = {"FP": [], "FF": []}
        fused_gain, fused_kept = [], 0  # fine-tuning's FP gain in the fused descriptor
        for k in tests:
            cfg = TrainConfig(**({"device": args.device} | overrides))
            pairs = read_pairs(args.data, [k])
            test, _ = protocol_files(args.data, pairs, [])
            train_people = [p for j in args.folds if j != k for p in people[j]]
            t0 = time.perf_counter()
            trained = train(cfg, train_folder(args.data, train_people, chips),
                            work / f"{name}-{k}".replace(" ", "_"), pretrained_dir=pretrained_dir)
            secs = time.perf_counter() - t0
            tuned_state = {n: v.clone() for n, v in trained.model.backbone.state_dict().items()}
            # the job's steps after training, as facegrad.pipeline runs them; the fine-tuned
            # network is scored before the choice, which may put the pretrained weights back
            gallery = build_gallery(cfg, trained)
            desc = gallery.descriptor  # the job's named descriptor ('auto': flip_mean first)
            tuned_desc = describe(cfg, trained.model, trained.device, test, desc,
                                  gallery.fusion)
            tuned = pair_figures(pairs, tuned_desc)
            chosen, judged, pre_gallery = choose_network(cfg, trained, gallery, pretrained_dir)
            served_gallery, choice = choose_descriptor(cfg, trained, chosen, judged,
                                                       pre_gallery, pretrained_dir)
            served_gallery, sface_tuning = tune_second_network(cfg, trained, served_gallery)
            # the served model's own verification threshold (its calibration step)
            own = calibrate(cfg, trained, served_gallery, judged)["verify_threshold"]
            if sface_tuning is not None:
                print(f"fold {k}: SFace fine-tuning kept {sface_tuning['kept']}, gain "
                      f"{sface_tuning.get('gain')}", flush=True)
                if sface_tuning["kept"] == "fine_tuned" and cfg.sface_refit:
                    served_gallery, refit = refit_second_network(cfg, trained, served_gallery)
                    print(f"fold {k}: SFace refitted on every person ({refit['people']} "
                          f"people, {refit['seconds']} s)", flush=True)
            kept = judged["kept"] if judged else "fine_tuned"  # after its fused judgement
            if served_gallery.descriptor != desc:  # the job took the fused descriptor
                served_desc = describe(cfg, trained.model, trained.device, test,
                                       served_gallery.descriptor, served_gallery.fusion)
            else:
                served_desc = None
            if k not in pre_figs:
                trained.model.backbone.load_state_dict(pretrained_state(pretrained_dir))
                pre_desc[k] = describe(cfg, trained.model, trained.device, test, desc,
                                       fusion_of(cfg, trained))
                pre_figs[k] = pair_figures(pairs, pre_desc[k])
            if served_desc is None:
                served_desc = tuned_desc if kept == "fine_tuned" else pre_desc[k]
            served = pair_figures(pairs, served_desc, own)
            in_fused = {}  # fused served after fine-tuning: both networks beside SFace
            if served_gallery.descriptor == "fused" and desc != "fused" and judged:
                in_fused[kept] = served
                other = "pretrained" if kept == "fine_tuned" else "fine_tuned"
                now = {n: v.clone() for n, v in trained.model.backbone.state_dict().items()}
                trained.model.backbone.load_state_dict(
                    tuned_state if other == "fine_tuned" else pretrained_state(pretrained_dir))
                cfg_fused = TrainConfig(**({"device": args.device} | overrides
                                           | {"descriptor": "fused"}))
                in_fused[other] = pair_figures(pairs, describe(
                    cfg, trained.model, trained.device, test, "fused",
                    fusion_of(cfg_fused, trained)))
                trained.model.backbone.load_state_dict(now)
                fused_gain.append(in_fused["fine_tuned"]["FP"]["accuracy"]
                                  - in_fused["pretrained"]["FP"]["accuracy"])
                fused_kept += kept == "fine_tuned"
            if args.fusion_rules and served_gallery.descriptor == "fused" and desc != "fused":
                rule_figs[k] = fusion_rule_figures(pairs, served_desc, served, served_gallery,
                                                   trained.split.held)
            kept_tuned += kept == "fine_tuned"
            fused += served_gallery.descriptor == "fused" and desc != "fused"
            served_fp.append(served["FP"]["accuracy"])
            for kind in gains:
                gains[kind].append(served[kind]["accuracy"] - pre_figs[k][kind]["accuracy"])
                at_own[kind].append(served[kind]["at_threshold"])
            rows.append([name, k, len(train_people),
                         *(f"{pre_figs[k][t]['accuracy']:.4f}" for t in ("FP", "FF")),
                         *(f"{tuned[t]['accuracy']:.4f}" for t in ("FP", "FF")), kept,
                         served_gallery.descriptor,
                         *(f"{served[t]['accuracy']:.4f}" for t in ("FP", "FF")),
                         *(f"{served[t]['accuracy'] - pre_figs[k][t]['accuracy']:+.4f}"
                           for t in ("FP", "FF")),
                         *(f"{in_fused[n]['FP']['accuracy']:.4f}" if in_fused else "-"
                           for n in ("pretrained", "fine_tuned")), f"{own:.3f}",
                         *(f"{served[t]['at_threshold']:.4f}" for t in ("FP", "FF")),
                         f"{secs:.0f}"])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
        summary[name] = gains | {"kept": kept_tuned, "fused": fused, "served_fp": served_fp,
                                 "at_own": at_own, "fused_gain": fused_gain,
                                 "fused_kept": fused_kept}
    heads = ["setting", "test fold", "job's people", "pretrained FP", "pretrained FF",
             "fine-tuned FP", "fine-tuned FF", "kept", "descriptor", "served FP", "served FF",
             "served FP gain", "served FF gain", "fused: pretrained FP", "fused: fine-tuned FP",
             "own threshold", "FP at it", "FF at it", "train s"]
    print()
    print(table(heads, rows))
    pre_fp = [pre_figs[k]["FP"]["accuracy"] for k in tests]
    lines = [f"pretrained FP over the folds: {mean_sd(pre_fp, signed=False)} (mean ± sd)"]
    for name, s in summary.items():
        lines.append(f"{name}: served FP {mean_sd(s['served_fp'], signed=False)}, served FP "
                     f"gain {mean_sd(s['FP'])}, FF gain {mean_sd(s['FF'])}, fine-tuned network "
                     f"kept in {s['kept']} of {len(tests)} folds, fused descriptor chosen in "
                     f"{s['fused']}")
        if s["fused_gain"]:
            lines.append(f"{name}: in the fused descriptor, fine-tuning's FP gain "
                         f"{mean_sd(s['fused_gain'])} over the {len(s['fused_gain'])} folds that "
                         f"served it; the job kept the fine-tuned network beside SFace in "
                         f"{s['fused_kept']}")
        lines.append(f"{name}: at the served model's own verification threshold, FF "
                     f"{mean_sd(s['at_own']['FF'], signed=False)}, FP "
                     f"{mean_sd(s['at_own']['FP'], signed=False)}")
    rule_md = rule_table(rule_figs, args.confirm) if rule_figs else []
    if rule_md:
        print("\nfusion rules (frontal-profile accuracy, frontal-frontal in brackets):")
        print("\n".join(rule_md))
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
              "flip_mean, or the job's named descriptor) on the same pairs. Own threshold: the "
              "served model's verification threshold (its calibration step); FP and FF at it: "
              "the accuracy of the fold's pairs there", "",
              "| " + " | ".join(heads) + " |", "|" + " --- |" * len(heads)]
        md += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
        md += ["", *(f"- {line}" for line in lines), ""]
        if rule_figs:
            md += ["Fusion rules: frontal-profile accuracy on each test fold's pairs, "
                   "frontal-frontal in brackets:", "",
                   *rule_md, ""]
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
