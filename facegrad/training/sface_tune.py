"""Fine-tuning SFace, the fused descriptor's second network, on a job's people.

Fine-tuning dlib's network gains on turned faces of people the job never saw, but beside SFace
most of that gain is one SFace already brings (docs/identification.md); SFace is the network
the fused descriptor leans on for profiles, so it is adapted too. The recipe is the job's for
dlib's network (:mod:`facegrad.training.loop`): a CosFace head (Wang et al. 2018; s 30, m 0.35)
imprinted with each person's mean descriptor (Qi et al. 2018), SGD with momentum at the job's
rate for the head and ``backbone_lr_scale`` of it for the network, cosine decay, the job's
clipping rule, mirrored faces as augmentation, then weight-space ensembling with the file's
weights (WiSE-FT, Wortsman et al. 2022; the job's ``sface_fine_tuned_share``).
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from facegrad.clipping import build_clipper
from facegrad.recognition import sface
from facegrad.recognition.models import CosineClassifier
from facegrad.training import checkpoint as ckpt
from facegrad.training.config import TrainConfig
from facegrad.training.loop import Cancelled, TrainingError, blend_with_pretrained

log = logging.getLogger(__name__)

# the settings a checkpoint must have been made with to be gone on from
RESUME_SETTINGS = {"sface_epochs", "learning_rate", "backbone_lr_scale", "batch_size", "clip",
                   "seed", "sface_fine_tuned_share"}


def fine_tune(cfg: TrainConfig, images, labels: np.ndarray, rows: np.ndarray,
              pretrained_part: torch.Tensor, device: torch.device,
              should_stop: Callable[[], bool] = lambda: False,
              checkpoint: Path | None = None) -> sface.SFace:
    """SFace fine-tuned on ``images[rows]`` (stored uint8 chips) of people ``labels[rows]`` for
    ``cfg.sface_epochs`` epochs, blended with the file's weights; ``pretrained_part``: the file's
    SFace descriptors of those rows (unit, as :func:`sface.describe` gives them), which imprint
    the head. Returns the network in eval mode, ready to describe.

    Raises :class:`Cancelled` when ``should_stop()`` says so (asked before each step), and
    :class:`TrainingError` at a non-finite loss or gradient when the job's clipping says
    ``on_nonfinite: fail`` (else the step is skipped, as the job's training does).

    ``checkpoint``: a path stem; after each epoch the network, its head, the optimizer's and the
    clipping rule's state and the random generator's are written there (safetensors + JSON,
    atomically), and a run that finds one made for the same rows and settings goes on from it,
    so a worker killed in this stage loses at most an epoch."""
    order = np.argsort(rows, kind="stable")  # rows in order; their descriptors with them
    rows, pretrained_part = rows[order], pretrained_part[torch.from_numpy(order)]
    net = copy.deepcopy(sface.network("cpu")).to(device).to(memory_format=torch.contiguous_format)
    start = {k: v.detach().clone() for k, v in net.state_dict().items()}
    net.requires_grad_(True)
    net.eval()  # its one batch norm left after folding keeps the file's statistics
    people, y_all = np.unique(labels[rows], return_inverse=True)
    y_all = torch.from_numpy(y_all.astype(np.int64))
    both = torch.nn.Module()  # the network and its head, clipped together as the job's are
    both.net = net
    both.head = CosineClassifier(pretrained_part.shape[1], len(people), scale=30.0, margin=0.35)
    both.head.imprint(torch.zeros(len(people), pretrained_part.shape[1]).index_add_(
        0, y_all, pretrained_part.float()))
    both.head.to(device)
    lr = float(cfg.learning_rate)
    opt = torch.optim.SGD([{"params": list(net.parameters()), "lr": lr * cfg.backbone_lr_scale},
                           {"params": list(both.head.parameters()), "lr": lr}],
                          momentum=0.9, weight_decay=5e-4)
    base = [g["lr"] for g in opt.param_groups]
    params = list(both.parameters())
    clipper = build_clipper(cfg.clip, both)
    gen = torch.Generator().manual_seed(cfg.seed)
    batch = min(cfg.batch_size, len(rows))
    per_epoch = len(rows) // batch
    total, step, skipped, first = cfg.sface_epochs * per_epoch, 0, 0, 0
    made_for = {"rows": hashlib.sha256(rows.tobytes() + labels[rows].tobytes()).hexdigest(),
                "settings": cfg.model_dump(mode="json", include=RESUME_SETTINGS)}
    if checkpoint is not None:
        first, step, skipped = _go_on_from(checkpoint, made_for, both, opt, clipper, gen, device)
    t0 = time.perf_counter()
    for epoch in range(first, cfg.sface_epochs):
        order = torch.randperm(len(rows), generator=gen)
        loss_sum = torch.zeros((), device=device)
        for i in range(per_epoch):
            if should_stop():
                raise Cancelled()
            pick = order[i * batch:(i + 1) * batch]
            x = torch.from_numpy(np.asarray(images[np.sort(rows[pick.numpy()])]))
            y = y_all[pick.sort().values].to(device)
            crops = sface.to_arcface(x.to(device).permute(0, 3, 1, 2).float() / 255)
            flip = torch.rand(len(crops), generator=gen) < 0.5
            crops[flip] = crops[flip].flip(3)
            loss = F.cross_entropy(both.head(F.normalize(net(crops), dim=1), y), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for g, b in zip(opt.param_groups, base):
                g["lr"] = b * 0.5 * (1 + math.cos(math.pi * step / max(total, 1)))
            loss_sum += loss.detach()
            if bool(clipper(params).finite) and bool(torch.isfinite(loss)):
                opt.step()
            elif cfg.clip.on_nonfinite == "fail":
                raise TrainingError(f"non-finite loss or gradient norm fine-tuning SFace at "
                                    f"epoch {epoch + 1}, step {i + 1}; lower the learning rate "
                                    f"or clip harder")
            else:
                skipped += 1
            step += 1
        log.info("SFace fine-tuning: epoch %d of %d, mean loss %.3f, %.0f s", epoch + 1,
                 cfg.sface_epochs, float(loss_sum) / max(per_epoch, 1), time.perf_counter() - t0)
        if checkpoint is not None:
            _save(checkpoint, made_for, both, opt, clipper, gen,
                  {"epoch": epoch + 1, "step": step, "skipped": skipped})
    if skipped:
        log.warning("SFace fine-tuning skipped %d of %d steps (gradients not finite)", skipped,
                    step)
    blend_with_pretrained(net, start, cfg.sface_fine_tuned_share)
    net.requires_grad_(False)
    return net.to(memory_format=torch.channels_last).eval()


def _save(stem: Path, made_for: dict, both: torch.nn.Module, opt: torch.optim.Optimizer,
          clipper, gen: torch.Generator, progress: dict) -> None:
    """The fine-tuning's state after an epoch, as the job's checkpoints are written."""
    tensors, meta = ckpt.training_state_to_flat(both, opt, clipper)
    ckpt.save(stem, tensors | {"rng": gen.get_state()},
              meta | {"made_for": made_for} | progress)


def _go_on_from(stem: Path, made_for: dict, both: torch.nn.Module, opt: torch.optim.Optimizer,
                clipper, gen: torch.Generator, device: torch.device) -> tuple[int, int, int]:
    """(epochs done, steps done, steps skipped): from the checkpoint at ``stem`` when one was
    made for these rows and settings (its state loaded into ``both``, ``opt``, ``clipper`` and
    ``gen``), else (0, 0, 0)."""
    if not stem.with_suffix(".json").is_file():
        return 0, 0, 0
    try:
        tensors, meta = ckpt.load(stem.with_suffix(".json"), device)
    except ckpt.CheckpointError as e:
        log.warning("SFace checkpoint unusable (%s): fine-tuning from the start", e)
        return 0, 0, 0
    if meta.get("made_for") != made_for:
        return 0, 0, 0
    ckpt.training_state_from_flat(both, opt, clipper, tensors, meta)
    gen.set_state(tensors["rng"].cpu())
    log.info("SFace fine-tuning goes on after epoch %d", meta["epoch"])
    return meta["epoch"], meta["step"], meta["skipped"]
