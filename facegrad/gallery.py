"""Embeddings, per-identity prototypes and the open-set threshold.

Identification compares a face's normalised embedding with one prototype per identity (the
normalised mean embedding of its images). The threshold on cosine similarity is calibrated on
validation images: for each one, its best similarity among the *other* identities' prototypes is
what a stranger's face would score, and the threshold is set so that at most ``target_fpir`` of
those stranger scores pass.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from facegrad.models import forward_logits
from facegrad.preprocess import resize_uint8, standardise


@torch.no_grad()
def embed(model: torch.nn.Module, images: np.ndarray | torch.Tensor, image_size: int,
          device: torch.device | str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """uint8 (N, S, S, 3) stored crops → (N, D) normalised embeddings on the CPU."""
    model.eval()
    x = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = resize_uint8(x[i:i + batch_size].to(device), image_size)
        emb, _ = forward_logits(model, standardise(xb))
        out.append(emb.float().cpu())
    if not out:
        return torch.zeros(0, getattr(model, "embed_dim", 128))
    return F.normalize(torch.cat(out), dim=1)


def prototypes(emb: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, D) normalised mean embedding per class (zero rows for classes without images)."""
    sums = torch.zeros(num_classes, emb.shape[1]).index_add_(0, labels.long(), emb)
    return F.normalize(sums, dim=1)


def open_set_scores(emb: torch.Tensor, labels: torch.Tensor, protos: torch.Tensor):
    """(genuine score, best other-identity score, rank-1 correct) per embedding."""
    sims = emb @ protos.t()
    genuine = sims.gather(1, labels.long().view(-1, 1)).squeeze(1)
    others = sims.scatter(1, labels.long().view(-1, 1), -2.0)
    return genuine, others.max(dim=1).values, sims.argmax(dim=1) == labels


def calibrate(emb: torch.Tensor, labels: torch.Tensor, protos: torch.Tensor,
              target_fpir: float) -> dict:
    """Threshold at the target false-positive identification rate, with rank-1 and TPIR."""
    if emb.shape[0] == 0 or protos.shape[0] < 2:
        return {"threshold": 0.5, "target_fpir": target_fpir, "calibrated_on": 0}
    genuine, stranger, correct = open_set_scores(emb, labels, protos)
    s = torch.sort(stranger, descending=True).values
    k = int(np.floor(target_fpir * len(s)))  # this many stranger scores may pass
    # Just above the (k+1)-th highest stranger score: at most k strangers are accepted.
    threshold = float(s[k]) + 1e-4 if k < len(s) else float(s[-1])
    accepted = stranger >= threshold
    tpir = (correct & (genuine >= threshold)).float().mean()
    return {
        "threshold": round(threshold, 6),
        "target_fpir": target_fpir,
        "fpir": float(accepted.float().mean()),
        "tpir": float(tpir),
        "rank1": float(correct.float().mean()),
        "calibrated_on": int(emb.shape[0]),
    }
