"""A training job's steps, in order: train → build the gallery → choose the network → choose
the descriptor → fine-tune the fused descriptor's second network → calibrate → refit that
network on every person → save the model.

:func:`run_training_job` runs them; each step is a function of its own. Above both
:mod:`facegrad.training` (the weights) and :mod:`facegrad.recognition` (galleries and open-set
thresholds); the service calls it with hooks that record progress, and knows the folders.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from facegrad.data import checkpoint as ckpt
from facegrad.data.preprocess import PREPROCESSING_VERSION, STORE_SIZE
from facegrad.data.store import FaceArrays
from facegrad.recognition import open_set, sface
from facegrad.recognition.architectures import architecture
from facegrad.recognition.gallery import (
    Fusion,
    embed,
    fit_fusion,
    fused_parts,
    holdout_identities,
)
from facegrad.training import sface_tune
from facegrad.training.config import TrainConfig
from facegrad.training.loop import Hooks, TrainedModel, pretrained_state, train


@dataclass
class JobResult:
    model_path: Path  # the model's JSON (model.json beside model.safetensors)
    history: list[dict]
    clipping: dict
    open_set: dict
    resumed_from_epoch: int | None = None
    info: dict = field(default_factory=dict)
    model_meta: dict = field(default_factory=dict)  # what model.json holds, as written


@dataclass
class GalleryEmbeddings:
    """Every image of the dataset described by the chosen network: ``emb`` (normalised
    descriptors, one row per image), ``owner`` (its identity, a label of the full dataset);
    ``descriptor``: how they were described (:func:`facegrad.recognition.gallery.embed`);
    ``fusion``: with the fused descriptor, how its two networks are put together, measured on
    these images (:func:`facegrad.recognition.gallery.fit_fusion`)."""

    emb: torch.Tensor
    owner: torch.Tensor
    descriptor: str = "flip_mean"
    fusion: Fusion | None = None
    # fused, where at hand: the file's SFace's unit descriptors (not the fine-tuned one's)
    second: torch.Tensor | None = None


def run_training_job(cfg: TrainConfig, data: FaceArrays, run_dir: Path,
                     hooks: Hooks | None = None, resume: Path | None = None,
                     pretrained_dir: Path | None = None,
                     dataset_dir: Path | None = None) -> JobResult:
    """Train on ``data`` and write ``run_dir/model.{json,safetensors}``: the network, a gallery
    of every image of the dataset and open-set thresholds calibrated on it.

    ``pretrained_dir``: where dlib's converted weights are kept (needed by a pretrained
    architecture); ``dataset_dir``: the stored dataset, read by the other ranks of a
    multi-device run (:func:`facegrad.training.loop.train`)."""
    hooks = hooks or Hooks()
    stage = hooks.on_stage
    trained = train(cfg, data, run_dir, hooks, resume, pretrained_dir, dataset_dir)
    stage("building the gallery")
    gallery = build_gallery(cfg, trained)
    stage("choosing the network")
    gallery, fine_tuning, pretrained = choose_network(cfg, trained, gallery, pretrained_dir)
    stage("choosing the descriptor")
    gallery, descriptor_choice = choose_descriptor(cfg, trained, gallery, fine_tuning,
                                                   pretrained, pretrained_dir)
    tune_stem, refit_stem = (Path(run_dir) / "checkpoints" / n for n in ("sface", "sface_every"))
    if gallery.descriptor == "fused":
        stage("fine-tuning SFace")
    gallery, sface_tuning = tune_second_network(cfg, trained, gallery, hooks.should_stop,
                                                tune_stem)
    stage("calibrating")
    open_set_rec = calibrate(cfg, trained, gallery, fine_tuning)
    if descriptor_choice is not None:
        open_set_rec["descriptor_choice"] = descriptor_choice
    if sface_tuning is not None:
        if sface_tuning["kept"] == "fine_tuned" and cfg.sface_refit:
            stage("refitting SFace on every person")
            gallery, sface_tuning["refit"] = refit_second_network(
                cfg, trained, gallery, hooks.should_stop, refit_stem)
        open_set_rec["sface_fine_tuning"] = sface_tuning
    stage("saving the model")
    model_path, meta = save_model(cfg, trained, gallery, open_set_rec, Path(run_dir))
    for stem in (tune_stem, refit_stem):  # the model holds the SFace it serves; each ~78 MB
        ckpt.remove(stem)
    return JobResult(model_path, trained.history, trained.clipping, meta["open_set"],
                     trained.resumed_from_epoch,
                     {"too_few_to_split": meta["too_few_to_split"],
                      "processes": trained.processes, "device": str(trained.device)}, meta)


def build_gallery(cfg: TrainConfig, trained: TrainedModel) -> GalleryEmbeddings:
    """Every image of the dataset (the identities held out of training too) embedded by the
    trained network; descriptor 'auto' starts from flip_mean (:func:`choose_descriptor`)."""
    descriptor = "flip_mean" if cfg.descriptor == "auto" else cfg.descriptor
    return _embed_all(cfg, trained.model, trained.device, trained.split.full, descriptor)


def _embed_all(cfg: TrainConfig, net: torch.nn.Module, device: torch.device,
               full: FaceArrays, descriptor: str) -> GalleryEmbeddings:
    """``full``'s images described by ``net``; with the fused descriptor, its two networks put
    together as these images call for."""
    emb = embed(net, np.asarray(full.images), cfg.image_size, device,
                normalisation=architecture(cfg.architecture).normalisation,
                descriptor=descriptor)
    owner = torch.from_numpy(full.labels.astype(np.int64))
    if descriptor != "fused":
        return GalleryEmbeddings(emb, owner, descriptor)
    emb, fusion = fit_fusion(emb, owner)
    return GalleryEmbeddings(emb, owner, descriptor, fusion)


def choose_network(cfg: TrainConfig, trained: TrainedModel, gallery: GalleryEmbeddings,
                   pretrained_dir: Path | None
                   ) -> tuple[GalleryEmbeddings, dict | None, GalleryEmbeddings | None]:
    """A pretrained architecture fine-tuned with identities held out is compared with the
    pretrained network on them (:func:`open_set.among_themselves`: each of their photos
    identified against their other photos, every pair verified). When fine-tuning made them
    worse, ``trained.model`` gets the pretrained weights back and the gallery is theirs.

    Returns (the chosen network's gallery, the comparison record or None when there was none
    to make, the pretrained network's gallery when the fine-tuned one was kept, for
    :func:`choose_descriptor` to judge the two again in the descriptor it serves)."""
    held = trained.split.held
    if not (architecture(cfg.architecture).pretrained and cfg.epochs and len(held)):
        return gallery, None, None
    model, full = trained.model, trained.split.full
    honest = torch.from_numpy(held.astype(np.int64))
    tuned_state = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    tuned = open_set.among_themselves(gallery.emb, gallery.owner, honest)
    model.backbone.load_state_dict(pretrained_state(pretrained_dir))  # now the original
    pretrained = _embed_all(cfg, model, trained.device, full, gallery.descriptor)
    pre = open_set.among_themselves(pretrained.emb, gallery.owner, honest)
    keep_tuned = open_set.better(tuned, pre)
    fine_tuning = {
        "held_out": [full.names[i] for i in held.tolist()],
        "measured_on": "the held-out people among themselves: each photo identified "
                       "against their other photos, and every pair of their photos verified",
        "fine_tuned_share": cfg.fine_tuned_share,  # the fine-tuned network is this blend
        "pretrained": pre, "fine_tuned": tuned,
        "gain": open_set.gain(tuned, pre),
        "kept": "fine_tuned" if keep_tuned else "pretrained",
    }
    if keep_tuned:
        model.backbone.load_state_dict(tuned_state)
        return gallery, fine_tuning, pretrained
    fine_tuning["note"] = ("fine-tuning did not make the network better on the "
                           "held-out people: the model keeps the pretrained network")
    return pretrained, fine_tuning, None


def choose_descriptor(cfg: TrainConfig, trained: TrainedModel, gallery: GalleryEmbeddings,
                      fine_tuning: dict | None = None, pretrained: GalleryEmbeddings | None = None,
                      pretrained_dir: Path | None = None
                      ) -> tuple[GalleryEmbeddings, dict | None]:
    """Descriptor 'auto': the chosen network's flip_mean descriptor, or the fused one (SFace
    beside it) where that tells people the network never trained on apart better.

    Both are measured as :func:`choose_network` measures networks
    (:func:`open_set.among_themselves` on the identities held out of training; with epochs 0,
    when none are held out, on as many people drawn the same way, since the networks trained
    on none of them), and fused is kept only when it is better (:func:`open_set.better`: none
    of the figures lower, their mean higher; a tie keeps flip_mean, which costs a quarter as
    much per face). On frontal photos both are near perfect and the job keeps flip_mean; on
    faces turned to profile, where dlib's network is weak and the pair together does better
    (docs/identification.md), it takes the pair.

    When fused is taken and :func:`choose_network` kept the fine-tuned network (``pretrained``:
    the pretrained network's gallery, ``fine_tuning``: that judgement's record), fine-tuning
    is judged again in the descriptor the model will serve: the fine-tuned network beside
    SFace against the pretrained one beside SFace, on the same people, by the same rule. A
    gain dlib's network alone shows may be one SFace already brings; where fine-tuning does
    not make the fused pair better, the model serves the pretrained network beside SFace,
    ``fine_tuning`` says so (``kept``, ``in_fused``) and ``trained.model`` gets the pretrained
    weights back (from ``pretrained_dir``).

    Returns (the chosen descriptor's gallery, the comparison record or None when the job named
    its descriptor)."""
    if cfg.descriptor != "auto":  # dlib_resnet's only (other architectures: flip_mean)
        return gallery, None
    full = trained.split.full
    if len(trained.split.held):
        people = trained.split.held
    elif not cfg.epochs:
        people = holdout_identities(full.labels, cfg.calibration_identities, cfg.seed)
    else:
        people = np.zeros(0, np.int64)
    record = {"chosen": "flip_mean", "candidates": ["flip_mean", "fused"]}
    if not len(people):
        record["note"] = ("no identities held out (too few, or calibration_identities 0): no "
                          "people the network did not train on to compare the descriptors on, "
                          "so flip_mean is kept")
        return gallery, record
    honest = torch.from_numpy(people.astype(np.int64))
    judged = torch.isin(gallery.owner, honest)
    rows = torch.nonzero(judged).view(-1)
    owner = gallery.owner[rows]
    # SFace's part beside the gallery's own flip_mean rows: the fused descriptor, weighed on
    # these people as it would be on a dataset of them
    part = _sface_part(cfg, trained, rows)
    second = part.new_zeros(len(gallery.owner), part.shape[1])
    second[rows] = part

    def fused_figures(first: torch.Tensor) -> dict:
        fused, _ = fit_fusion(torch.cat([first[rows], part], 1), owner)
        return open_set.among_themselves(fused, owner, honest)

    figures = {"flip_mean": open_set.among_themselves(gallery.emb[rows], owner, honest),
               "fused": fused_figures(gallery.emb)}
    record |= {
        "measured_on": "the people held out of training among themselves: each photo "
                       "identified against their other photos, and every pair verified",
        **figures,
        "gain": open_set.gain(figures["fused"], figures["flip_mean"])}
    if not open_set.better(figures["fused"], figures["flip_mean"]):
        return gallery, record
    record["chosen"] = "fused"
    rest = torch.nonzero(~judged).view(-1)
    if len(rest):
        second[rest] = _sface_part(cfg, trained, rest)
    if pretrained is not None and fine_tuning is not None:
        pre = fused_figures(pretrained.emb)
        keep_tuned = open_set.better(figures["fused"], pre)
        fine_tuning["in_fused"] = {"pretrained": pre, "fine_tuned": figures["fused"],
                                   "gain": open_set.gain(figures["fused"], pre),
                                   "kept": "fine_tuned" if keep_tuned else "pretrained"}
        if not keep_tuned:
            trained.model.backbone.load_state_dict(pretrained_state(pretrained_dir))
            gallery = pretrained
            fine_tuning["kept"] = "pretrained"
            fine_tuning["note"] = ("fine-tuning made dlib's network better on the held-out "
                                   "people alone but not beside SFace, in the fused descriptor "
                                   "the model serves: the model keeps the pretrained network")
    emb, fusion = fit_fusion(torch.cat([gallery.emb, second], 1), gallery.owner)
    return GalleryEmbeddings(emb, gallery.owner, "fused", fusion, second), record


def _sface_part(cfg: TrainConfig, trained: TrainedModel, rows: torch.Tensor,
                net: torch.nn.Module | None = None) -> torch.Tensor:
    """SFace's descriptors (the fused descriptor's second part) of the dataset's ``rows``;
    ``net``: a fine-tuned SFace (default: the file's)."""
    describer = sface.describer() if net is None else sface.Describer(net)
    return embed(describer, np.asarray(trained.split.full.images), cfg.image_size,
                 trained.device, index=rows.numpy(),
                 normalisation=architecture(cfg.architecture).normalisation)


def tune_second_network(cfg: TrainConfig, trained: TrainedModel, gallery: GalleryEmbeddings,
                        should_stop: Callable[[], bool] = lambda: False,
                        checkpoint: Path | None = None
                        ) -> tuple[GalleryEmbeddings, dict | None]:
    """With the fused descriptor: SFace fine-tuned on the people dlib's network trained on
    (:func:`facegrad.training.sface_tune.fine_tune`), judged as the networks are: the fused
    descriptors of the held-out people with the fine-tuned SFace against those with SFace as it
    is (:func:`open_set.among_themselves`, kept only when :func:`open_set.better`).

    Skipped (the record says why) with ``sface_epochs`` or ``epochs`` 0, with no people held out
    to judge on, and in a private job: its guarantee covers the training that clips and noises
    each example, which this fine-tuning does not.

    ``should_stop``: the job's cancellation, asked before each step of the fine-tuning;
    ``checkpoint``: where the fine-tuning keeps its epochs' checkpoints, and goes on from one.

    Returns (the served gallery, the record; None for other descriptors)."""
    if gallery.descriptor != "fused":
        return gallery, None
    record: dict = {}
    held = trained.split.held
    if not (cfg.sface_epochs and cfg.epochs):
        record["note"] = "sface_epochs or epochs 0: SFace as it is"
    elif cfg.privacy is not None or cfg.clip.mode == "per_example":
        record["note"] = ("a private job: SFace is not fine-tuned on the dataset, which the "
                          "privacy guarantee would not cover")
    elif not len(held):
        record["note"] = "no identities held out to judge a fine-tuned SFace on: SFace as it is"
    if record:
        return gallery, record | {"kept": "pretrained"}
    full = trained.split.full
    first = fused_parts(gallery.emb)[0]  # dlib's unit descriptors
    second = _sface_as_is(cfg, trained, gallery)
    honest = torch.from_numpy(held.astype(np.int64))
    judged = torch.isin(gallery.owner, honest)
    train_rows = torch.from_numpy(trained.split.train_idx.astype(np.int64))
    t0 = time.perf_counter()
    net = sface_tune.fine_tune(cfg, np.asarray(full.images), full.labels, train_rows.numpy(),
                               second[train_rows], trained.device, should_stop, checkpoint)
    secs = time.perf_counter() - t0
    rows = torch.nonzero(judged).view(-1)
    owner = gallery.owner[rows]
    tuned_part = _sface_part(cfg, trained, rows, net)

    def figures(part: torch.Tensor) -> dict:
        fused, _ = fit_fusion(torch.cat([first[rows], part], 1), owner)
        return open_set.among_themselves(fused, owner, honest)

    pre, tuned = figures(second[rows]), figures(tuned_part)
    keep = open_set.better(tuned, pre)
    record = {"epochs": cfg.sface_epochs, "fine_tuned_share": cfg.sface_fine_tuned_share,
              "seconds": round(secs, 1),
              "measured_on": "the people held out of training among themselves, in the fused "
                             "descriptor the model serves",
              "pretrained": pre, "fine_tuned": tuned, "gain": open_set.gain(tuned, pre),
              "kept": "fine_tuned" if keep else "pretrained"}
    if not keep:
        return gallery, record
    tuned_all = torch.empty_like(second)  # every row with the fine-tuned SFace, each once
    tuned_all[rows] = tuned_part
    rest = torch.nonzero(~judged).view(-1)
    tuned_all[rest] = _sface_part(cfg, trained, rest, net)
    return _beside_tuned_sface(gallery, tuned_all, net, second), record


def refit_second_network(cfg: TrainConfig, trained: TrainedModel, gallery: GalleryEmbeddings,
                         should_stop: Callable[[], bool] = lambda: False,
                         checkpoint: Path | None = None
                         ) -> tuple[GalleryEmbeddings, dict]:
    """SFace fine-tuned again, by the recipe :func:`tune_second_network` judged and kept, on
    every photo of every person (the held-out people and the validation photos too), and the
    gallery described with it: the judgement chose the recipe on people it had not trained on,
    and the served network then learns from all of them (refitting on all the data once the
    model is chosen: Hastie, Tibshirani & Friedman, The Elements of Statistical Learning,
    §7.10). Run after :func:`calibrate`, whose thresholds are measured with the judged SFace on
    the held-out people while it had never seen them; the refitted network is the same recipe
    on a quarter more people, so its scores for people it never saw are of the same kind.

    ``should_stop`` and ``checkpoint`` as for :func:`tune_second_network`. Returns (the served
    gallery, the record)."""
    full = trained.split.full
    every = np.arange(len(gallery.owner))
    second = _sface_as_is(cfg, trained, gallery)
    t0 = time.perf_counter()
    net = sface_tune.fine_tune(cfg, np.asarray(full.images), full.labels, every, second,
                               trained.device, should_stop, checkpoint)
    secs = time.perf_counter() - t0
    tuned = _sface_part(cfg, trained, torch.from_numpy(every), net)
    record = {"people": len(np.unique(full.labels)), "photos": len(every),
              "seconds": round(secs, 1),
              "note": "the served SFace: the kept recipe refitted on every photo of every "
                      "person; the figures above and the thresholds are the judged SFace's, "
                      "measured on held-out people it had not trained on"}
    return _beside_tuned_sface(gallery, tuned, net, second), record


def _sface_as_is(cfg: TrainConfig, trained: TrainedModel,
                 gallery: GalleryEmbeddings) -> torch.Tensor:
    """The file's SFace's unit descriptors of every gallery row, not centred (fit_fusion
    centres them): the gallery's own where at hand."""
    if gallery.second is not None:
        return gallery.second
    return _sface_part(cfg, trained, torch.arange(len(gallery.owner)))


def _beside_tuned_sface(gallery: GalleryEmbeddings, tuned: torch.Tensor,
                        net: torch.nn.Module, second: torch.Tensor) -> GalleryEmbeddings:
    """The served gallery: the gallery's dlib part beside ``tuned`` (every row described by
    the fine-tuned SFace ``net``), fused as fitted on them; ``second``: the file's SFace's
    descriptors, kept for a later fine-tuning's head."""
    emb, fusion = fit_fusion(torch.cat([fused_parts(gallery.emb)[0], tuned], 1), gallery.owner)
    return GalleryEmbeddings(emb, gallery.owner, "fused", replace(fusion, network=net), second)


def calibrate(cfg: TrainConfig, trained: TrainedModel, gallery: GalleryEmbeddings,
              fine_tuning: dict | None) -> dict:
    """The open-set record (:func:`open_set.calibrate`): thresholds and their figures.

    The honest strangers are the identities held out of training, the known faces theirs and
    the validation images; with none held out (or the pretrained network kept, which trained on
    none of them) every identity is a stranger to the others, which is optimistic for a network
    trained on them all, and the record says so."""
    split, n_ids = trained.split, len(trained.split.full.names)
    held = split.held
    if len(held) and (fine_tuning is None or fine_tuning["kept"] == "fine_tuned"):
        honest = torch.from_numpy(held.astype(np.int64))
        rows = torch.cat([torch.nonzero(torch.isin(gallery.owner, honest)).view(-1),
                          torch.from_numpy(split.val_idx.astype(np.int64))])
        record = open_set.calibrate(gallery.emb, gallery.owner, n_ids, honest, rows,
                                    cfg.target_fpir, cfg.verify_max_far)
    else:
        record = open_set.calibrate(gallery.emb, gallery.owner, n_ids, torch.arange(n_ids), None,
                                    cfg.target_fpir, cfg.verify_max_far)
        if cfg.epochs and not len(held):
            record["note"] = ("too few identities to hold some out of training: "
                              "calibrated on the trained identities (optimistic)")
    if fine_tuning is not None:
        record["fine_tuning"] = fine_tuning
    if len(held):
        record["held_out"] = [split.full.names[i] for i in held.tolist()]
    return record


def save_model(cfg: TrainConfig, trained: TrainedModel, gallery: GalleryEmbeddings,
               open_set_rec: dict, run_dir: Path) -> tuple[Path, dict]:
    """``run_dir/model.{json,safetensors}``: the network's weights, the gallery and the record
    that :class:`facegrad.recognition.inference.LoadedModel` reads. Returns (the JSON's path,
    what it holds)."""
    full, trained_on = trained.split.full, trained.split.trained_on
    counts = torch.bincount(gallery.owner, minlength=len(full.names))
    arch = architecture(cfg.architecture)
    preprocessing = {"version": PREPROCESSING_VERSION, "store_size": STORE_SIZE,
                     "image_size": cfg.image_size, "channels": 3,
                     "normalisation": arch.normalisation,
                     "descriptor": gallery.descriptor}
    if gallery.fusion is not None:  # its centre is a tensor of the file, fusion.centre
        preprocessing["fusion_weights"] = list(gallery.fusion.weights)
        # SFace's weights: the file's, or fine-tuned ones in the tensors sface.*
        preprocessing["sface"] = "pretrained" if gallery.fusion.network is None else "fine_tuned"
    if arch.network:
        preprocessing["network"] = arch.network
    model_meta = {
        "kind": "model",
        "architecture": cfg.architecture,
        "labels": full.names,  # the gallery's identities
        "classifier_labels": trained_on.names,  # the identities the classifier was trained on
        "num_classes": len(trained_on.names),
        "preprocessing": preprocessing,
        "config": cfg.model_dump(),
        "history": trained.history,
        "open_set": open_set_rec,
        "gallery": {"source": "training", "scoring": "nearest_image",
                    "counts": {n: int(c) for n, c in zip(full.names, counts)}},
        "too_few_to_split": [trained_on.names[i] for i in trained.split.too_few],
    }
    if trained.privacy is not None:  # what the weights' (epsilon, delta) guarantee covers
        model_meta["privacy"] = trained.privacy | {
            "covers": "the training images as they shape the weights; not the gallery, the "
                      "fused descriptor's centre and weights fitted on the dataset, nor the "
                      "calibration on held-out people (docs/privacy.md)"}
    tensors = {f"model.{k}": v for k, v in trained.model.state_dict().items()}
    tensors |= {"gallery.emb": gallery.emb, "gallery.owner": gallery.owner,
                "gallery.counts": counts}
    if gallery.fusion is not None and gallery.fusion.centre is not None:
        tensors["fusion.centre"] = gallery.fusion.centre
    if gallery.fusion is not None and gallery.fusion.network is not None:  # fine-tuned SFace
        tensors |= {f"sface.{k}": v.detach().cpu().contiguous()
                    for k, v in gallery.fusion.network.state_dict().items()}
    return ckpt.save(run_dir / "model", tensors, model_meta), model_meta
