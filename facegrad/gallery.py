"""Embeddings, identity scores and the calibrated open-set thresholds.

A face's embedding is its normalised descriptor (:func:`facegrad.models.describe`: for new
models the backbone's 2x2-pooled feature maps beside LBP histograms), computed on the crop and,
for new models, on the crop zoomed out (``scale_tta`` in the model's preprocessing: the
normalised descriptors of each scale are added; earlier models added the crop's mirror
image instead, ``flip_tta``), after within-class normalisation (:mod:`facegrad.within_class`).
Identification scores a face against every identity of the gallery by its highest cosine
similarity to one of that identity's images (nearest neighbour: a probe in a pose or lighting
that one enrolled image shares scores as it should, where the mean of all of them would blur
it), adjusted for how tightly that identity's images cluster (:func:`identity_scores`). The face is
then named only if its best identity stands out from the runner-up (:func:`decide`: the best
score less ``RUNNER_UP_WEIGHT`` of how far the runner-up scores above its usual level); below the
threshold it is "unknown".

Calibration is honest only against people the model never saw: a model scores the other trained
identities of a face far lower than it scores a stranger, because training pushed exactly those
apart. When a dataset has enough identities, a share of them is therefore held out of training
(``TrainConfig.calibration_identities``) and :func:`calibrate_open_set` uses them twice: each
held-out person in turn is a stranger to a gallery of everyone else (trained and held-out), and
is enrolled from half of their images and probed with the other half, both ways round.
By default the threshold is the highest of three points between those strangers' scores and the
known faces' scores: where they balance, a stranger accepted weighing ``STRANGER_COST`` known
faces rejected; ``BETWEEN_MEANS_SHARE`` of the way from the strangers' mean score to the known
faces'; and the score ``KNOWN_FLOOR_SHARE`` of the known faces reach. With ``target_fpir`` it is
set at that
false-positive identification rate (FPIR) of the strangers. The verification threshold
is the best split of same-person and different-person pairs of held-out people. The held-out
people are then enrolled into the gallery like any other.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from facegrad.models import LBP_SHARE, describe
from facegrad.preprocess import normaliser, resize_uint8, zoom
from facegrad.within_class import WithinClassNorm

MIN_IDENTITIES_TO_HOLD_OUT = 10  # below this, holding people out costs too much training data
TIGHTNESS_WEIGHT = 0.5  # share of an identity's cluster tightness taken off its scores
# a stranger given someone's name costs this many known faces answered "unknown": the complaint
# users of face APIs make most is strangers matched to enrolled people
STRANGER_COST = 2.0
# share of the runner-up identity's score taken off the best one's (:func:`decide`). A known face
# scores high against its own identity and ordinary against everyone else; a stranger who
# resembles one person usually resembles a few, so the runner-up scores high too. On ORL (30
# trained people, 10 strangers, eight seeded draws) the worst of the four open-set
# ratios at the calibrated threshold rose from 0.935 to 0.961 on average, and from 0.822 to 0.889
# at the worst draw (0.4: 0.961/0.844; 0.6: 0.956/0.889)
RUNNER_UP_WEIGHT = 0.5
# the default threshold is never below this share of the way from the calibration strangers' mean
# score to the known faces' mean (:func:`_between_means`). The balance point rests on the tails of
# normal fits to a few dozen scores of a handful of held-out people, and moves with them; two
# means move far less. On ORL (30 trained people, 10 strangers; the same 16 seeded draws scored
# by every policy, and 8 further draws kept out of the choice) the worst of the four
# open-set ratios at the calibrated threshold rose from 0.968 to 0.981 on average and from 0.844
# to 0.889 at the worst draw (the 8 further draws: 0.962 to 0.979, 0.878 to 0.889), against the
# balance point with a floor at 95 % of the known faces, which it replaces (0.34: 0.977/0.970;
# 0.38: 0.979/0.968; details in docs/benchmarks.md, session 5)
BETWEEN_MEANS_SHARE = 0.4
# ... and never below the score this share of the calibration's known faces reach
# (:func:`_known_floor`): when the held-out people happen to look unlike everyone, both points
# above sink towards them, while there is nothing to gain from a threshold that more than this
# share of known faces clear anyway
KNOWN_FLOOR_SHARE = 0.99


@torch.no_grad()
def embed(model: torch.nn.Module, images: np.ndarray | torch.Tensor, image_size: int,
          device: torch.device | str = "cpu", batch_size: int = 256,
          flip_tta: bool = False, index: np.ndarray | None = None,
          descriptor: str = "backbone", lbp_share: float = LBP_SHARE,
          within_class: WithinClassNorm | None = None,
          scales: tuple[float, ...] = (1.0,),
          normalisation: str = "per_image_standardise") -> torch.Tensor:
    """uint8 (N, S, S, 3) stored crops → (N, D) normalised face descriptors on the CPU.

    ``descriptor``, ``flip_tta`` and ``lbp_share``: see :func:`facegrad.models.describe`;
    ``scales``: the crop is described at each of these zooms (:func:`facegrad.preprocess.zoom`,
    all in one batch) and the normalised descriptors are added; ``within_class``: the model's
    within-class normalisation (:mod:`facegrad.within_class`), applied last. ``index`` picks
    rows (of a memory-mapped dataset, say), read one batch at a time.
    """
    model.eval()
    normalise = normaliser(normalisation)
    rows = np.arange(len(images)) if index is None else np.asarray(index)
    out = None  # filled a batch at a time: a large gallery is not copied by a final cat
    for i in range(0, len(rows), batch_size):
        chunk = images[rows[i:i + batch_size]]
        if isinstance(chunk, np.ndarray):
            chunk = torch.from_numpy(np.ascontiguousarray(chunk))
        xb = normalise(resize_uint8(chunk.to(device), image_size))
        if len(scales) > 1:
            xb = torch.cat([zoom(xb, s) for s in scales])
        d = describe(model, xb, descriptor, flip_tta, lbp_share).float().cpu()
        d.div_(d.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if len(scales) > 1:
            d = d.view(len(scales), -1, d.shape[1]).sum(0)
            d.div_(d.norm(dim=1, keepdim=True).clamp_min(1e-12))
        if within_class is not None:
            within_class.apply_(d)
        if out is None:
            out = torch.empty(len(rows), d.shape[1])
        out[i:i + len(d)] = d
    if out is None:
        with torch.no_grad():
            probe = torch.zeros(1, 3, image_size, image_size, device=device)
            return torch.zeros(0, describe(model, probe, descriptor, False, lbp_share).shape[1])
    return out


def cluster_tightness(gallery: torch.Tensor, owner: torch.Tensor, num_identities: int,
                      default: float) -> torch.Tensor:
    """(C,) per identity: the mean, over its images, of the similarity to its nearest other image.

    ``default`` for identities with fewer than two images.
    """
    out = torch.full((num_identities,), float(default))
    if not gallery.shape[0]:
        return out
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=num_identities).tolist()
    for ident, rows in enumerate(torch.split(order, counts)):
        if len(rows) >= 2:
            out[ident] = _tightness(gallery[rows])
    return out


def _tightness(emb: torch.Tensor) -> float:
    sims = emb @ emb.t()
    sims.fill_diagonal_(-2.0)
    return float(sims.max(1).values.mean())


def adjust(raw: torch.Tensor, tightness: torch.Tensor, reference: float,
           weight: float | None = None) -> torch.Tensor:
    """Identity scores (M, C) after the cluster-tightness adjustment (see
    :func:`identity_scores`); ``tightness`` broadcasts against them, (C,) or (M, C). Identities
    without images keep their -2."""
    w = TIGHTNESS_WEIGHT if weight is None else weight
    return torch.where(raw > -1.5, raw - w * (tightness - reference), raw)


def tightness_with_reference(gallery: torch.Tensor, owner: torch.Tensor,
                             num_identities: int) -> tuple[torch.Tensor, float]:
    """(per-identity tightness, reference): the reference is the mean over identities with two
    or more images, and stands in for those with fewer."""
    tight = cluster_tightness(gallery, owner, num_identities, float("nan"))
    known = ~torch.isnan(tight)
    reference = float(tight[known].mean()) if bool(known.any()) else 0.0
    return torch.where(known, tight, torch.tensor(reference)), reference


def score_adjustment(reference: float, runner_up_reference: float | None = None) -> dict:
    """The model's record of how identity scores are adjusted (see :func:`identity_scores`) and
    of how the decision weighs the runner-up (see :func:`decide`)."""
    rec = {"method": "cluster_tightness", "weight": TIGHTNESS_WEIGHT,
           "reference": round(reference, 6)}
    if runner_up_reference is not None:
        rec |= {"runner_up_weight": RUNNER_UP_WEIGHT,
                "runner_up_reference": round(runner_up_reference, 6)}
    return rec


def _runner_up_adjustment(reference: float, known_second: torch.Tensor) -> dict:
    """:func:`score_adjustment` whose runner-up reference is the mean runner-up score of the
    calibration's correctly ranked known faces (NaN where they had none; 0 without any)."""
    known_second = known_second[~torch.isnan(known_second)]
    return score_adjustment(reference,
                            float(known_second.mean()) if known_second.numel() else 0.0)


def top_two(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(best identity, its score, the runner-up's score) per row of identity scores (M, C); the
    runner-up is NaN where fewer than two identities have images (they score -2)."""
    if scores.shape[1] < 2:
        v, a = scores.max(1)
        return a, v, torch.full_like(v, float("nan"))
    vals, idx = scores.topk(2, dim=1)
    second = torch.where(vals[:, 1] > -1.5, vals[:, 1], torch.tensor(float("nan")))
    return idx[:, 0], vals[:, 0], second


def decide(scores: torch.Tensor, adjustment: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(best identity, decision score) per row of identity scores (M, C).

    The decision score is the best identity's score less ``runner_up_weight`` times how far the
    runner-up scores above ``runner_up_reference`` (the runner-up's mean over the known faces of
    calibration; nothing is taken where there is no runner-up), so it reads as the best score
    for a typical known face and is lower where another identity fits nearly as well. Models
    calibrated before the runner-up counted (no ``runner_up_weight``) decide on the best score.
    """
    best, top, second = top_two(scores)
    return best, decision_score(top, second, adjustment)


def decision_score(top: torch.Tensor, second: torch.Tensor, adjustment: dict | None
                   ) -> torch.Tensor:
    """:func:`decide`'s score from the best and runner-up scores (NaN: no runner-up)."""
    weight = (adjustment or {}).get("runner_up_weight")
    if not weight:
        return top
    excess = torch.nan_to_num(second - float(adjustment["runner_up_reference"]), nan=0.0)
    return torch.where(top > -1.5, top - weight * excess, top)


def identity_scores(emb: torch.Tensor, gallery: torch.Tensor, owner: torch.Tensor,
                    num_identities: int, tightness: torch.Tensor | None = None,
                    reference: float = 0.0, weight: float | None = None) -> torch.Tensor:
    """(M, C): per probe and identity, the highest cosine similarity to one of its images.

    With ``tightness`` (:func:`cluster_tightness`), each identity's score is lowered by
    ``weight`` (default ``TIGHTNESS_WEIGHT``) times how much tighter its images cluster than
    ``reference``, and raised as much where they cluster looser. The people a model was trained
    on cluster tightly (training pulled their images together) and a stranger who resembles one
    of them scores high against all of that person's images; a person enrolled later clusters
    as loosely as their own probes will score. One threshold then fits both. Identities without
    images score -2.
    """
    sims = emb @ gallery.t()
    out = torch.full((emb.shape[0], num_identities), -2.0)
    if gallery.shape[0]:
        idx = owner.long().view(1, -1).expand(emb.shape[0], -1)
        out = out.scatter_reduce(1, idx, sims, reduce="amax", include_self=True)
        if tightness is not None:
            out = adjust(out, tightness, reference, weight)
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


def _balanced_threshold(hit_scores: torch.Tensor, stranger: torch.Tensor,
                        stranger_cost: float | None = None) -> float:
    """The threshold balancing known faces rejected against strangers accepted.

    ``hit_scores`` are the best scores of correctly ranked known probes. With a few dozen scores
    on each side an empirical optimum sits at the edge of one sample, so both sides are fitted
    with a normal distribution, and the threshold is where the share of known faces rejected
    equals ``stranger_cost`` (default ``STRANGER_COST``) times the share of strangers accepted.
    """
    cost = STRANGER_COST if stranger_cost is None else stranger_cost
    k, st = hit_scores.double(), stranger.double()
    if k.numel() < 2 or st.numel() < 2 or float(k.mean()) <= float(st.mean()):
        return float(torch.quantile(st, 0.95)) if st.numel() else 0.5
    mk, sk = float(k.mean()), max(float(k.std()), 1e-3)
    ms, ss = float(st.mean()), max(float(st.std()), 1e-3)

    def excess(t: float) -> float:  # cost x strangers accepted - known rejected; falls with t
        accepted = 0.5 * math.erfc((t - ms) / (ss * math.sqrt(2)))
        rejected = 0.5 * math.erfc((mk - t) / (sk * math.sqrt(2)))
        return cost * accepted - rejected

    lo, hi = ms, mk
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if excess(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def _known_floor(hit_scores: torch.Tensor, share: float = KNOWN_FLOOR_SHARE) -> float | None:
    """The score that ``share`` of the known faces reach, from a normal fit of their scores
    (None for fewer than two)."""
    k = hit_scores.double()
    if k.numel() < 2:
        return None
    z = math.sqrt(2) * float(torch.erfinv(torch.tensor(2 * share - 1, dtype=torch.float64)))
    return float(k.mean() - z * k.std())


def _between_means(hit_scores: torch.Tensor, stranger: torch.Tensor,
                   share: float = BETWEEN_MEANS_SHARE) -> float | None:
    """The score ``share`` of the way from the strangers' mean score to the known faces' (None
    without scores on both sides)."""
    if not hit_scores.numel() or not stranger.numel():
        return None
    ms = float(stranger.double().mean())
    return ms + share * (float(hit_scores.double().mean()) - ms)


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
    tight, reference = tightness_with_reference(gallery, owner, num_identities)
    rows = torch.nonzero(is_held).view(-1)
    # as newly enrolled, each held-out person is enrolled from one half of their images and
    # probed with the other (both ways round), as a user enrols a few photos and then asks
    # about others: leaving out one image at a time scored them as if they had been enrolled
    # from nearly every view of themselves, and set the threshold too high for real enrollees
    half = torch.full((len(gallery),), -1)
    tight_other_half = torch.empty(len(gallery))
    for ident in held.tolist():
        mine = torch.nonzero(owner == ident).view(-1)
        halves = (mine[:len(mine) // 2], mine[len(mine) // 2:])
        for h, (probe_rows, enrolled_rows) in enumerate((halves, halves[::-1])):
            half[probe_rows] = h
            tight_other_half[probe_rows] = (_tightness(gallery[enrolled_rows])
                                            if len(enrolled_rows) >= 2 else reference)
    # per probe: (best identity, its score, the runner-up's score), decided once the runner-up's
    # usual level among known faces is known
    stranger, enrolled = [], []
    idx_all = owner.long().view(1, -1)
    for chunk in rows.split(512):
        sims = gallery[chunk] @ gallery.t()  # (B, N)
        own = owner[chunk].view(-1, 1)
        init = torch.full((len(chunk), num_identities), -2.0)
        idx = idx_all.expand(len(chunk), -1)
        # as a stranger: the gallery without any of the person's images
        as_stranger = init.scatter_reduce(1, idx, sims, "amax")
        stranger.append(top_two(adjust(as_stranger, tight, reference).scatter(1, own, -2.0)))
        # as a newly enrolled person: the gallery without the probe's half of their images
        same_half = (idx == own) & (half.view(1, -1) == half[chunk].view(-1, 1))
        as_probe = torch.where(same_half, torch.tensor(-2.0), sims)
        as_probe = init.scatter_reduce(1, idx, as_probe, "amax")
        t = tight.view(1, -1).repeat(len(chunk), 1).scatter(
            1, own, tight_other_half[chunk].view(-1, 1))
        a, v, second = top_two(adjust(as_probe, t, reference))
        enrolled.append((a == own.view(-1), v, second))
    ok_t, top_t, second_t = (torch.cat(x) for x in zip(*enrolled))
    # validation images of trained people, against the whole calibration gallery
    val_best, val_top, val_second = top_two(
        identity_scores(probes, gallery, owner, num_identities, tight, reference))
    val_ok = val_best == probe_labels
    adjustment = _runner_up_adjustment(reference, torch.cat([second_t[ok_t], val_second[val_ok]]))
    stranger_t = decision_score(torch.cat([x[1] for x in stranger]),
                                torch.cat([x[2] for x in stranger]), adjustment)
    score_t = decision_score(top_t, second_t, adjustment)
    val_score = decision_score(val_top, val_second, adjustment)
    floor = between = balanced = None
    if target_fpir is not None:
        threshold = _threshold_at(stranger_t, target_fpir)
    else:  # known faces: held-out people's images scored as newly enrolled, plus validation
        # images of trained people (on their own these few sit too high: the model knows them)
        known = torch.cat([score_t[ok_t], val_score[val_ok]])
        balanced = _balanced_threshold(known, stranger_t)
        between = _between_means(known, stranger_t)
        floor = _known_floor(known)
        threshold = max(x for x in (balanced, between, floor) if x is not None)
    rec = {
        "threshold": round(threshold, 6),
        "target_fpir": target_fpir,
        "policy": "balanced" if target_fpir is None else "target_fpir",
        "balance_point": None if balanced is None else round(balanced, 6),
        "between_means": None if between is None else round(between, 6),
        "known_floor": None if floor is None else round(floor, 6),
        "method": "held_out_identities",
        "held_out_identities": len(held),
        "calibrated_on": int(stranger_t.numel()),
        "fpir": float((stranger_t >= threshold).float().mean()),
        "enrolled_rank1": float(ok_t.float().mean()),
        "enrolled_tpir": float((ok_t & (score_t >= threshold)).float().mean()),
        "score_adjustment": adjustment,
    }
    if probes.shape[0]:
        rec["rank1"] = float(val_ok.float().mean())
        rec["tpir"] = float((val_ok & (val_score >= threshold)).float().mean())
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
    tight, reference = tightness_with_reference(gallery, owner, num_identities)
    sims = identity_scores(emb, gallery, owner, num_identities, tight, reference)
    best, top, second = top_two(sims)
    correct = best == labels
    adjustment = _runner_up_adjustment(reference, second[correct])
    genuine = decision_score(top, second, adjustment)
    stranger = decide(sims.scatter(1, labels.long().view(-1, 1), -2.0), adjustment)[1]
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
        "score_adjustment": adjustment,
        "verify_threshold": round(vthr, 6),
        "verify_balanced_accuracy": vacc,
        "verify_pairs": pairs,
    }
