"""Embeddings, identity scores and the calibrated open-set thresholds.

A face's embedding is the normalised sum of the model's embeddings of the crop and of its mirror
image (flip test-time augmentation, recorded in the model's preprocessing as ``flip_tta``).
Identification scores a face against every identity of the gallery by its highest cosine
similarity to one of that identity's images (nearest neighbour: a probe in a pose or lighting
that one enrolled image shares scores as it should, where the mean of all of them would blur
it); below the threshold the face is "unknown".

Calibration is honest only against people the model never saw: a model scores the other trained
identities of a face far lower than it scores a stranger, because training pushed exactly those
apart. When a dataset has enough identities, a share of them is therefore held out of training
(``TrainConfig.calibration_identities``) and :func:`calibrate_open_set` uses them twice: each
held-out person in turn is a stranger to a gallery of everyone else (trained and held-out), and
each of their images is a probe of a newly enrolled person against the rest of their images.
The threshold is set at the target false-positive identification rate (FPIR) of those strangers;
the verification threshold is the best split of same-person and different-person pairs of
held-out people. The held-out people are then enrolled into the gallery like any other.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from facegrad.models import forward_logits
from facegrad.preprocess import resize_uint8, standardise

MIN_IDENTITIES_TO_HOLD_OUT = 10  # below this, holding people out costs too much training data


@torch.no_grad()
def embed(model: torch.nn.Module, images: np.ndarray | torch.Tensor, image_size: int,
          device: torch.device | str = "cpu", batch_size: int = 256,
          flip_tta: bool = False) -> torch.Tensor:
    """uint8 (N, S, S, 3) stored crops → (N, D) normalised embeddings on the CPU.

    With ``flip_tta`` an embedding is that of the image plus that of its mirror image.
    """
    model.eval()
    x = torch.as_tensor(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb = standardise(resize_uint8(x[i:i + batch_size].to(device), image_size))
        emb, _ = forward_logits(model, xb)
        if flip_tta:
            emb = emb + forward_logits(model, xb.flip(3))[0]
        out.append(emb.float().cpu())
    if not out:
        return torch.zeros(0, getattr(model, "embed_dim", 128))
    return F.normalize(torch.cat(out), dim=1)


def prototypes(emb: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, D) normalised mean embedding per class (zero rows for classes without images)."""
    sums = torch.zeros(num_classes, emb.shape[1]).index_add_(0, labels.long(), emb)
    return F.normalize(sums, dim=1)


def identity_scores(emb: torch.Tensor, gallery: torch.Tensor, owner: torch.Tensor,
                    num_identities: int) -> torch.Tensor:
    """(M, C): per probe and identity, the highest cosine similarity to one of its images.

    Identities without images score -2 (below any cosine).
    """
    sims = emb @ gallery.t()
    out = torch.full((emb.shape[0], num_identities), -2.0)
    if gallery.shape[0]:
        idx = owner.long().view(1, -1).expand(emb.shape[0], -1)
        out = out.scatter_reduce(1, idx, sims, reduce="amax", include_self=True)
    return out


def holdout_identities(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """The identities (label values) held out of training for calibration; seeded.

    ``round(fraction * C)`` of the C identities that have at least 2 images, when C is at least
    ``MIN_IDENTITIES_TO_HOLD_OUT``, and always at least 2 then (a held-out person is a stranger
    to a gallery that includes the others); none otherwise.
    """
    ids, counts = np.unique(labels, return_counts=True)
    eligible = ids[counts >= 2]
    n = int(round(fraction * len(ids)))
    if fraction <= 0 or len(ids) < MIN_IDENTITIES_TO_HOLD_OUT or len(eligible) < 2:
        return np.zeros(0, dtype=np.int64)
    n = min(max(2, n), len(eligible), len(ids) - 2)
    rng = np.random.default_rng([seed, 5])
    return np.sort(rng.choice(eligible, size=n, replace=False)).astype(np.int64)


def _threshold_at(stranger: torch.Tensor, target_fpir: float) -> float:
    """The score that at most ``target_fpir`` of the stranger scores reach.

    With tens of stranger scores an empirical tail quantile rests on one or two of them, so the
    threshold is the higher of the interpolated empirical quantile and that of a normal
    distribution with the scores' mean and standard deviation (the conservative of the two).
    """
    s = stranger.double()
    emp = float(torch.quantile(s, 1 - target_fpir))
    if len(s) < 2:
        return emp
    z = math.sqrt(2) * torch.erfinv(torch.tensor(1 - 2 * target_fpir, dtype=torch.float64))
    normal = float(s.mean() + float(z) * s.std())
    return min(1.0, max(emp, normal))


def _verify_threshold(emb: torch.Tensor, labels: torch.Tensor) -> tuple[float, float, int]:
    """(threshold, balanced accuracy, pairs) best separating same/different-person pairs."""
    n = emb.shape[0]
    iu = torch.triu_indices(n, n, 1)
    sims = (emb @ emb.t())[iu[0], iu[1]]
    same = labels[iu[0]] == labels[iu[1]]
    if not same.any() or same.all():
        return 0.5, float("nan"), 0
    cand = torch.sort(sims).values
    cand = torch.cat([cand[:1] - 1e-4, (cand[1:] + cand[:-1]) / 2, cand[-1:] + 1e-4])
    tpr = (sims[same].view(1, -1) >= cand.view(-1, 1)).float().mean(1)
    tnr = (sims[~same].view(1, -1) < cand.view(-1, 1)).float().mean(1)
    bal = 0.5 * (tpr + tnr)
    best = bal.max()
    ok = torch.nonzero(bal >= best - 1e-9).view(-1)
    thr = 0.5 * float(cand[ok[0]] + cand[ok[-1]])  # middle of the best interval
    return thr, float(best), int(len(sims))


def calibrate_open_set(gallery: torch.Tensor, owner: torch.Tensor, num_identities: int,
                       held_out: list[int], probes: torch.Tensor, probe_labels: torch.Tensor,
                       target_fpir: float) -> dict:
    """Thresholds from held-out identities (see the module doc).

    ``gallery``/``owner``: every gallery image (training images of the trained identities and
    all images of the held-out ones); ``probes``/``probe_labels``: validation images of trained
    identities (may be empty). Returns the ``open_set`` record of the model.
    """
    held = torch.tensor(sorted(held_out), dtype=torch.long)
    is_held = torch.isin(owner, held)
    stranger, enrolled_ok, enrolled_score = [], [], []
    for h in held.tolist():
        mine = owner == h
        rest = ~mine
        s = identity_scores(gallery[mine], gallery[rest], owner[rest], num_identities)
        stranger.append(s.max(1).values)
        for i in torch.nonzero(mine).view(-1).tolist():  # a newly enrolled person's probe
            keep = torch.ones(len(owner), dtype=torch.bool)
            keep[i] = False
            sc = identity_scores(gallery[i:i + 1], gallery[keep], owner[keep], num_identities)
            v, a = sc.max(1)
            enrolled_ok.append(bool(a.item() == h))
            enrolled_score.append(float(v))
    stranger_t = torch.cat(stranger)
    threshold = _threshold_at(stranger_t, target_fpir)
    enrolled_hit = [ok and s >= threshold for ok, s in zip(enrolled_ok, enrolled_score)]
    rec = {
        "threshold": round(threshold, 6),
        "target_fpir": target_fpir,
        "method": "held_out_identities",
        "held_out_identities": len(held),
        "calibrated_on": int(stranger_t.numel()),
        "fpir": float((stranger_t >= threshold).float().mean()),
        "enrolled_rank1": float(np.mean(enrolled_ok)),
        "enrolled_tpir": float(np.mean(enrolled_hit)),
    }
    if probes.shape[0]:
        v, a = identity_scores(probes, gallery, owner, num_identities).max(1)
        correct = a == probe_labels
        rec["rank1"] = float(correct.float().mean())
        rec["tpir"] = float((correct & (v >= threshold)).float().mean())
    # verification: pairs among held-out people, and of held-out people with validation images
    v_emb = torch.cat([gallery[is_held], probes])
    v_lab = torch.cat([owner[is_held], probe_labels])
    vthr, vacc, pairs = _verify_threshold(v_emb, v_lab)
    rec |= {"verify_threshold": round(vthr, 6), "verify_balanced_accuracy": vacc,
            "verify_pairs": pairs}
    return rec


def calibrate(emb: torch.Tensor, labels: torch.Tensor, gallery: torch.Tensor,
              owner: torch.Tensor, num_identities: int, target_fpir: float) -> dict:
    """Fallback without held-out identities: scores against the *other* trained identities.

    Far too optimistic for true strangers (training pushed exactly those identities apart); the
    record says so in ``note``.
    """
    if emb.shape[0] == 0 or num_identities < 2:
        return {"threshold": 0.5, "target_fpir": target_fpir, "calibrated_on": 0,
                "method": "none", "verify_threshold": 0.5}
    sims = identity_scores(emb, gallery, owner, num_identities)
    genuine = sims.gather(1, labels.long().view(-1, 1)).squeeze(1)
    correct = sims.argmax(1) == labels
    stranger = sims.scatter(1, labels.long().view(-1, 1), -2.0).max(1).values
    threshold = _threshold_at(stranger, target_fpir)
    vthr, vacc, pairs = _verify_threshold(torch.cat([gallery, emb]), torch.cat([owner, labels]))
    return {
        "threshold": round(threshold, 6),
        "target_fpir": target_fpir,
        "method": "other_trained_identities",
        "note": "fewer identities than needed to hold some out: the threshold was calibrated "
                "on the trained identities themselves and accepts strangers more often than "
                "target_fpir says",
        "fpir": float((stranger >= threshold).float().mean()),
        "tpir": float((correct & (genuine >= threshold)).float().mean()),
        "rank1": float(correct.float().mean()),
        "calibrated_on": int(emb.shape[0]),
        "verify_threshold": round(vthr, 6),
        "verify_balanced_accuracy": vacc,
        "verify_pairs": pairs,
    }
