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
By default the threshold is the equal-error point between those strangers' scores and the known
faces' scores; with ``target_fpir`` it is set at that false-positive identification rate (FPIR)
of the strangers. The verification threshold is the best split of same-person and
different-person pairs of held-out people. The held-out people are then enrolled into the
gallery like any other.
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
          flip_tta: bool = False, index: np.ndarray | None = None) -> torch.Tensor:
    """uint8 (N, S, S, 3) stored crops → (N, D) normalised embeddings on the CPU.

    With ``flip_tta`` an embedding is that of the image plus that of its mirror image.
    ``index`` picks rows (of a memory-mapped dataset, say), read one batch at a time.
    """
    model.eval()
    rows = np.arange(len(images)) if index is None else np.asarray(index)
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = images[rows[i:i + batch_size]]
        if isinstance(chunk, np.ndarray):
            chunk = torch.from_numpy(np.ascontiguousarray(chunk))
        xb = standardise(resize_uint8(chunk.to(device), image_size))
        emb, _ = forward_logits(model, xb)
        if flip_tta:
            emb = emb + forward_logits(model, xb.flip(3))[0]
        out.append(emb.float().cpu())
    if not out:
        return torch.zeros(0, getattr(model, "embed_dim", 128))
    return F.normalize(torch.cat(out), dim=1)


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


def _balanced_threshold(hit_scores: torch.Tensor, stranger: torch.Tensor) -> float:
    """The equal-error threshold between known faces' and strangers' best scores.

    ``hit_scores`` are the best scores of correctly ranked known probes. With a few dozen scores
    on each side an empirical optimum sits at the edge of one sample, so both sides are fitted
    with a normal distribution and the threshold is where the share of known faces rejected
    equals the share of strangers accepted: (t - mu_s) / sd_s = (mu_k - t) / sd_k.
    """
    k, st = hit_scores.double(), stranger.double()
    if k.numel() < 2 or st.numel() < 2 or float(k.mean()) <= float(st.mean()):
        return float(torch.quantile(st, 0.95)) if st.numel() else 0.5
    mk, sk = float(k.mean()), max(float(k.std()), 1e-3)
    ms, ss = float(st.mean()), max(float(st.std()), 1e-3)
    return (ms * sk + mk * ss) / (sk + ss)


def _verify_threshold(emb: torch.Tensor, labels: torch.Tensor,
                      max_images: int = 3000) -> tuple[float, float, int]:
    """(threshold, balanced accuracy, pairs) best separating same/different-person pairs.

    All pairs of at most ``max_images`` images (a seeded sample beyond that); the threshold is
    the middle of the best-separating gap.
    """
    if emb.shape[0] > max_images:
        keep = torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(0))
        emb, labels = emb[keep[:max_images]], labels[keep[:max_images]]
    n = emb.shape[0]
    iu = torch.triu_indices(n, n, 1)
    sims = (emb @ emb.t())[iu[0], iu[1]].double()
    same = labels[iu[0]] == labels[iu[1]]
    n_same, n_diff = int(same.sum()), int((~same).sum())
    if not n_same or not n_diff:
        return 0.5, float("nan"), 0
    order = torch.argsort(sims)
    s, sm = sims[order], same[order]
    # cutting before sorted pair k accepts pairs k.. : k = 0..P
    zero = torch.zeros(1, dtype=torch.float64)
    same_below = torch.cat([zero, torch.cumsum(sm.double(), 0)])
    diff_below = torch.cat([zero, torch.cumsum((~sm).double(), 0)])
    bal = 0.5 * ((n_same - same_below) / n_same + diff_below / n_diff)
    edges = torch.cat([s[:1] - 1e-3, (s[1:] + s[:-1]) / 2, s[-1:] + 1e-3])
    distinct = torch.cat([torch.tensor([True]), s[1:] > s[:-1], torch.tensor([True])])
    bal = torch.where(distinct, bal, torch.tensor(-1.0, dtype=torch.float64))
    k = int(torch.argmax(bal))
    return float(edges[k]), float(bal[k]), int(len(sims))


def calibrate_open_set(gallery: torch.Tensor, owner: torch.Tensor, num_identities: int,
                       held_out: list[int], probes: torch.Tensor, probe_labels: torch.Tensor,
                       target_fpir: float | None) -> dict:
    """Thresholds from held-out identities (see the module doc).

    ``gallery``/``owner``: every gallery image (training images of the trained identities and
    all images of the held-out ones); ``probes``/``probe_labels``: validation images of trained
    identities (may be empty). Returns the ``open_set`` record of the model.
    """
    held = torch.tensor(sorted(held_out), dtype=torch.long)
    is_held = torch.isin(owner, held)
    rows = torch.nonzero(is_held).view(-1)
    stranger, enrolled_ok, enrolled_score = [], [], []
    idx_all = owner.long().view(1, -1)
    for chunk in rows.split(512):
        sims = gallery[chunk] @ gallery.t()  # (B, N)
        own = owner[chunk].view(-1, 1)
        init = torch.full((len(chunk), num_identities), -2.0)
        idx = idx_all.expand(len(chunk), -1)
        # as a stranger: the gallery without any of the person's images
        as_stranger = torch.where(idx == own, torch.tensor(-2.0), sims)
        stranger.append(init.scatter_reduce(1, idx, as_stranger, "amax").max(1).values)
        # as a newly enrolled person: the gallery without this one image
        self_col = torch.zeros_like(sims, dtype=torch.bool)
        self_col[torch.arange(len(chunk)), chunk] = True
        as_probe = torch.where(self_col, torch.tensor(-2.0), sims)
        v, a = init.scatter_reduce(1, idx, as_probe, "amax").max(1)
        enrolled_ok.append(a == own.view(-1))
        enrolled_score.append(v)
    stranger_t = torch.cat(stranger)
    ok_t, score_t = torch.cat(enrolled_ok), torch.cat(enrolled_score)
    if target_fpir is not None:
        threshold = _threshold_at(stranger_t, target_fpir)
    else:  # known faces: held-out people's images scored as newly enrolled, plus validation
        # images of trained people (on their own these few sit too high: the model knows them)
        hits = [score_t[ok_t]]
        if probes.shape[0]:
            v, a = identity_scores(probes, gallery, owner, num_identities).max(1)
            hits.append(v[a == probe_labels])
        threshold = _balanced_threshold(torch.cat(hits), stranger_t)
    enrolled_ok = ok_t.tolist()
    enrolled_hit = (ok_t & (score_t >= threshold)).tolist()
    rec = {
        "threshold": round(threshold, 6),
        "target_fpir": target_fpir,
        "policy": "balanced" if target_fpir is None else "target_fpir",
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
              owner: torch.Tensor, num_identities: int, target_fpir: float | None) -> dict:
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
    # the stranger scores here are optimistic, so only an explicit or a strict FPIR fits them
    threshold = _threshold_at(stranger, target_fpir or 0.01)
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
