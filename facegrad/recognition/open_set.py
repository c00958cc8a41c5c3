"""Open-set figures and thresholds of a model's gallery, for every architecture.

The gallery holds every image of a dataset; a face scores each identity by its highest cosine
similarity to one of that identity's images (nearest image), and is named when the best score
clears the threshold.

Calibration scores the gallery as it will be served, leaving out only what a probe must not
see (:func:`leave_out_scores`):

- a *known* face is each image of an honest identity scored against the gallery less that one
  image (leave-one-out): its person keeps every other photo, as in service. Scores rise with the
  number of photos a person has enrolled (the best of more images), so calibrating on a gallery
  cut in half would put the threshold where known faces of the real gallery seldom fall;
- a *stranger* is each image of an honest identity scored against the gallery less all of that
  person's images: everyone else keeps all of theirs, as in service.

An identity is honest when the network never trained on it: with the pretrained network used as
it is every identity is; after training (fine-tuning, or training from scratch) only those held
out of it (``TrainConfig.calibration_identities``) are, since training pulls a trained person's
images together and pushes the others away.

The threshold is the equal-error point of the two score distributions
(:func:`equal_error_threshold`), or, with ``target_fpir``, the score that share of strangers
reaches. The threshold-free figure
that compares two networks is the share of known faces named at the score only 5 % of strangers
reach (TPIR at FPIR 0.05, as in NIST's open-set identification reports, FRVT part 2).
"""

from __future__ import annotations

import math

import torch

COMPARE_FPIR = 0.05
# the equal-error search starts at this error rate: the scores' 1 % tails, not their single
# most extreme values, mark the edges of the gap between known faces and strangers
EER_FLOOR = 0.01


def equal_error_threshold(known: torch.Tensor, stranger: torch.Tensor,
                          floor: float = EER_FLOOR) -> float:
    """The score where the share of known faces rejected equals the share of strangers accepted
    (the equal error rate's point), halfway between the known faces' ``r`` quantile and the
    strangers' ``1 - r`` one at the smallest ``r >= floor`` where the two meet. When the scores
    separate, that is the middle of the gap between their ``floor`` tails.

    A cost-weighted balance of normal fits put the threshold next to the known faces: a face's
    best score is a maximum over images, and its lower tail is longer than a normal one's. On
    the pretrained network's leave-one-out scores (ORL and ORL faces in photos, people s01-s20
    to choose, s21-s40 to confirm; 5 draws of 15 known and 5 strangers each) this point named
    0.956-1.000 of the known faces' unseen photos and rejected 0.980-1.000 of the strangers'.
    The balance of normal fits (a stranger accepted costing two known faces rejected) put it at
    0.964 on 30 ORL people, naming 0.967 of their unseen images.
    """
    k, st = known.double(), stranger.double()
    if not k.numel() or not st.numel():
        return float(torch.quantile(st, 1 - floor)) if st.numel() else 0.5
    lo, hi = floor, 0.5  # bisect on r: known_q(r) - stranger_q(1 - r) rises with r
    if _gap(k, st, lo) >= 0:
        hi = lo
    for _ in range(40):
        if hi - lo < 1e-4:
            break
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if _gap(k, st, mid) >= 0 else (mid, hi)
    r = hi
    return (float(torch.quantile(k, r)) + float(torch.quantile(st, 1 - r))) / 2


def _gap(k: torch.Tensor, st: torch.Tensor, r: float) -> float:
    return float(torch.quantile(k, r)) - float(torch.quantile(st, 1 - r))


def threshold_at(stranger: torch.Tensor, target_fpir: float) -> float:
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


# verification pairs: every pair of images while there are at most VERIFY_EXACT_PAIRS of them
# (2000 images), else a seeded sample of VERIFY_SAMPLE_PAIRS per kind (same person, different
# people). The balanced accuracy weighs the two kinds equally, so sampling each kind on its own
# leaves it unbiased, and with a million pairs of a kind the share of either kind on one side of
# a threshold is known to +-0.001 (two standard errors, sqrt(0.25 / 1e6) each); the memory is
# that of 2 million pairs (tens of MB) however large the gallery
VERIFY_EXACT_PAIRS = 2_000_000
VERIFY_SAMPLE_PAIRS = 1_000_000


def verify_threshold(emb: torch.Tensor, labels: torch.Tensor,
                     max_pairs: int = VERIFY_EXACT_PAIRS,
                     sample_pairs: int = VERIFY_SAMPLE_PAIRS,
                     max_far: float | None = None) -> tuple[float, float, int]:
    """(threshold, balanced accuracy at it, pairs) separating same/different-person pairs.

    Every pair of images when there are at most ``max_pairs``, else a seeded sample of
    ``sample_pairs`` same-person pairs (all of them when there are no more) and as many
    different-person pairs (:func:`_sample_pairs`); the threshold is the middle of the
    best-separating gap, raised to the interpolated ``1 - max_far`` quantile of the
    different-person scores where that is higher: a cap on the false accept rate, the operating
    point verification is reported at (FNMR at a fixed FMR: ISO/IEC 19795-1, NIST FRVT).
    """
    sims, same = pair_scores(emb, labels, max_pairs, sample_pairs)
    threshold, balanced, pairs = _best_cut(sims, same)
    if max_far is None or not pairs:
        return threshold, balanced, pairs
    cap = float(torch.quantile(sims[~same], 1 - max_far))
    if cap <= threshold:
        return threshold, balanced, pairs
    accepted = sims >= cap
    balanced = 0.5 * (float(accepted[same].double().mean())
                      + float((~accepted[~same]).double().mean()))
    return cap, balanced, pairs


def pair_scores(emb: torch.Tensor, labels: torch.Tensor, max_pairs: int = VERIFY_EXACT_PAIRS,
                sample_pairs: int = VERIFY_SAMPLE_PAIRS) -> tuple[torch.Tensor, torch.Tensor]:
    """(cosine similarity, same person) of every pair of rows, or of a seeded sample of them
    past ``max_pairs`` (:func:`verify_threshold`)."""
    n = emb.shape[0]
    if n * (n - 1) // 2 <= max_pairs:
        iu = torch.triu_indices(n, n, 1)
        sims = (emb @ emb.t())[iu[0], iu[1]].double()
        return sims, labels[iu[0]] == labels[iu[1]]
    i, j = _sample_pairs(labels, sample_pairs)
    sims = torch.cat([(emb[a] * emb[b]).sum(1) for a, b in
                      zip(i.split(1 << 14), j.split(1 << 14))]).double()
    return sims, labels[i] == labels[j]


def tar_at_far(sims: torch.Tensor, same: torch.Tensor, far: float) -> float:
    """Share of same-person pairs scoring above the score that only ``far`` of the
    different-person pairs exceed."""
    if not same.any() or same.all():
        return float("nan")
    cut = torch.quantile(sims[~same], 1 - far)
    return float((sims[same] > cut).double().mean())


def _sample_pairs(labels: torch.Tensor, per_kind: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row pairs (i, j), i != j: every same-person pair when there are at most ``per_kind``,
    else ``per_kind`` drawn with replacement (a person in proportion to their pairs, then two
    of their images), and ``per_kind`` different-person pairs drawn uniformly (two images
    drawn, pairs of one person drawn again). Seeded: the same gallery gives the same pairs."""
    g = torch.Generator().manual_seed(0)
    labels = labels.long()
    order = torch.argsort(labels, stable=True)
    ids, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    pairs_of = counts * (counts - 1) // 2
    if int(pairs_of.sum()) <= per_kind:
        parts = [torch.triu_indices(int(c), int(c), 1) + int(s)
                 for c, s in zip(counts.tolist(), starts.tolist()) if c > 1]
        same = torch.cat(parts, 1) if parts else torch.zeros(2, 0, dtype=torch.long)
        si, sj = order[same[0]], order[same[1]]
    else:
        who = torch.multinomial(pairs_of.double(), per_kind, replacement=True, generator=g)
        c = counts[who]
        a = (torch.rand(per_kind, generator=g, dtype=torch.float64) * c).long().clamp_(max=c - 1)
        b = (torch.rand(per_kind, generator=g, dtype=torch.float64) * (c - 1)).long()
        b = torch.minimum(b, c - 2)
        b = b + (b >= a).long()  # a second, different image of the same person
        si, sj = order[starts[who] + a], order[starts[who] + b]
    n = labels.numel()
    di, dj, got = [], [], 0
    while got < per_kind and len(ids) > 1:
        i = torch.randint(n, (per_kind,), generator=g)
        j = torch.randint(n, (per_kind,), generator=g)
        keep = labels[i] != labels[j]
        take = min(int(keep.sum()), per_kind - got)
        di.append(i[keep][:take])
        dj.append(j[keep][:take])
        got += take
    empty = torch.zeros(0, dtype=torch.long)
    return (torch.cat([si] + di) if di else si.clone() if len(si) else empty,
            torch.cat([sj] + dj) if dj else sj.clone() if len(sj) else empty)


def _best_cut(sims: torch.Tensor, same: torch.Tensor) -> tuple[float, float, int]:
    """The threshold between sorted pair scores with the best balanced accuracy."""
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


def identity_best(sims: torch.Tensor, owner: torch.Tensor, num_identities: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(best identity, its score) per row of image similarities (B, N) given each image's
    owner; images set to -2 are left out, identities without images score -2."""
    out = torch.full((sims.shape[0], num_identities), -2.0)
    out = out.scatter_reduce(1, owner.view(1, -1).expand_as(sims), sims, "amax")
    v, a = out.max(1)
    return a, v


# probes are scored against the gallery in chunks of at most this many similarities (rows x N),
# so calibration's working memory (the chunk's similarities, their masked copy, the per-identity
# maxima: ~16 MB each at most) does not grow with the gallery; every row is scored on its own,
# so the chunking changes no figure
SCORE_CELLS = 1 << 22
# probes of each kind scored against the gallery: above this a seeded sample, so that calibration
# costs O(N) rather than O(N²) in the gallery's size; 20k probes put 200 scores in a 1 % tail,
# which is where the thresholds are read (equal_error_threshold, threshold_at)
MAX_PROBES = 20_000


def leave_out_scores(emb: torch.Tensor, owner: torch.Tensor, num_identities: int,
                     honest: torch.Tensor, known_rows: torch.Tensor | None = None,
                     chunk: int = 1024) -> dict[str, torch.Tensor]:
    """Scores of the gallery ``emb`` (N, D) (normalised, owners ``owner``) against itself.

    ``honest``: the identities that are strangers in turn; ``known_rows``: the rows probed as
    known faces (default: every row of an honest identity). Returns ``known_ok`` (the best
    identity is the right one), ``known_score`` and ``stranger_score``. Probes go ``chunk``
    rows at a time, fewer for a large gallery (``SCORE_CELLS``).
    """
    chunk = max(1, min(chunk, SCORE_CELLS // max(1, emb.shape[0], num_identities)))
    owner = owner.long()
    is_honest = torch.isin(owner, honest.long())
    if known_rows is None:
        known_rows = torch.nonzero(is_honest).view(-1)
    known_rows = _at_most(known_rows, MAX_PROBES)
    stranger_rows = _at_most(torch.nonzero(is_honest).view(-1), MAX_PROBES)
    out = {"known_ok": [], "known_score": [], "stranger_score": []}
    for rows, kind in ((known_rows, "known"), (stranger_rows, "stranger")):
        for part in rows.split(chunk):
            sims = emb[part] @ emb.t()
            own = owner[part].view(-1, 1)
            if kind == "known":  # less the probe image itself
                sims[torch.arange(len(part)), part] = -2.0
            else:  # less every image of the probe's person
                sims = sims.masked_fill(owner.view(1, -1) == own, -2.0)
            best, score = identity_best(sims, owner, num_identities)
            if kind == "known":
                out["known_ok"].append(best == own.view(-1))
                out["known_score"].append(score)
            else:
                out["stranger_score"].append(score)
    empty = {"known_ok": torch.zeros(0, dtype=torch.bool)}
    return {k: torch.cat(v) if v else empty.get(k, torch.zeros(0)) for k, v in out.items()}


def _at_most(rows: torch.Tensor, n: int) -> torch.Tensor:
    """``rows``, or a seeded sample of ``n`` of them (in their order) when there are more."""
    if rows.numel() <= n:
        return rows
    pick = torch.randperm(rows.numel(), generator=torch.Generator().manual_seed(0))[:n]
    return rows[pick.sort().values]


def figures(scores: dict[str, torch.Tensor], threshold: float) -> dict:
    """Known named, strangers rejected at ``threshold``, and TPIR at FPIR ``COMPARE_FPIR``."""
    ok, known, stranger = scores["known_ok"], scores["known_score"], scores["stranger_score"]
    out = {"known_faces": int(ok.numel()), "strangers": int(stranger.numel())}
    if ok.numel():
        out["rank1"] = round(float(ok.float().mean()), 4)
        out["known_named"] = round(float((ok & (known >= threshold)).float().mean()), 4)
    if stranger.numel():
        out["strangers_rejected"] = round(float((stranger < threshold).float().mean()), 4)
    if ok.numel() and stranger.numel():
        at = float(torch.quantile(stranger.double(), 1 - COMPARE_FPIR))
        out["tpir_at_fpir_0.05"] = round(float((ok & (known > at)).float().mean()), 4)
    return out


def calibrate(emb: torch.Tensor, owner: torch.Tensor, num_identities: int,
              honest: torch.Tensor, known_rows: torch.Tensor | None,
              target_fpir: float | None, verify_max_far: float | None = None) -> dict:
    """The ``open_set`` record: identify thresholds from :func:`leave_out_scores`, the verify
    threshold from the honest identities' pairs (:func:`verify_threshold`)."""
    scores = leave_out_scores(emb, owner, num_identities, honest, known_rows)
    ok, known, stranger = scores["known_ok"], scores["known_score"], scores["stranger_score"]
    if target_fpir is not None and stranger.numel():
        threshold, policy = threshold_at(stranger, target_fpir), "target_fpir"
    else:
        threshold, policy = equal_error_threshold(known[ok], stranger), "equal_error"
    rec = {"threshold": round(threshold, 6), "target_fpir": target_fpir, "policy": policy,
           "method": "leave_out", "honest_identities": int(honest.numel()),
           "calibrated_on": int(stranger.numel())}
    rec |= figures(scores, threshold)
    if "strangers_rejected" in rec:
        rec["fpir"] = round(1 - rec["strangers_rejected"], 4)
    is_honest = torch.isin(owner.long(), honest.long())
    vthr, vacc, pairs = verify_threshold(emb[is_honest], owner[is_honest],
                                         max_far=verify_max_far)
    rec |= {"verify_threshold": round(vthr, 6), "verify_balanced_accuracy": vacc,
            "verify_pairs": pairs, "verify_max_far": verify_max_far}
    return rec


JUDGED = ("tpir_at_fpir_0.05", "verify_accuracy", "verify_tar_at_far_0.01")


def among_themselves(emb: torch.Tensor, owner: torch.Tensor, people: torch.Tensor) -> dict:
    """How well descriptors ``emb`` tell ``people`` (identities in ``owner``) apart among
    themselves, with no other identity in the gallery: identification (each photo against the
    others, each person a stranger to the rest: TPIR at FPIR 0.05) and verification of every
    pair of their photos (the best threshold's balanced accuracy, TAR at FAR 0.01).

    This is what a job's network is judged by on people it did not train on, as the pair
    protocols of LFW and CFP measure: a gallery holding the trained people would flatter the
    fine-tuned network, which has pulled those people's photos together.
    """
    rows = torch.nonzero(torch.isin(owner.long(), people.long())).view(-1)
    sub = emb[rows]
    _, labels = torch.unique(owner[rows].long(), return_inverse=True)
    n = int(labels.max()) + 1 if len(labels) else 0
    scores = leave_out_scores(sub, labels, n, torch.arange(n))
    ok, known, stranger = scores["known_ok"], scores["known_score"], scores["stranger_score"]
    out = {"people": n, "photos": int(len(rows))}
    if ok.numel() and stranger.numel():
        at = float(torch.quantile(stranger.double(), 1 - COMPARE_FPIR))
        out["tpir_at_fpir_0.05"] = round(float((ok & (known > at)).float().mean()), 4)
    sims, same = pair_scores(sub, labels)
    _, acc, pairs = _best_cut(sims, same)
    out |= {"verify_accuracy": round(acc, 4), "verify_pairs": pairs,
            "verify_tar_at_far_0.01": round(tar_at_far(sims, same, 0.01), 4)}
    return out


def gain(a: dict, b: dict) -> dict:
    """Figures ``a`` minus ``b`` (:func:`among_themselves`), per judged figure both have."""
    return {k: round(a[k] - b[k], 4) for k in JUDGED
            if a.get(k) is not None and b.get(k) is not None}


def better(a: dict, b: dict) -> bool:
    """Whether figures ``a`` (:func:`among_themselves`) are better than ``b``'s: none of TPIR
    at FPIR 0.05, verification accuracy and TAR at FAR 0.01 lower, and their mean higher (a
    tie keeps ``b``, the network as it was). A gain in identification bought with a loss in
    verification is no gain: on CFP a job that traded 0.9 points of the held-out people's
    verification accuracy for 7 points of TPIR verified unseen people's pairs worse."""
    def score(f):
        return sum(f.get(k) or 0.0 for k in JUDGED) / len(JUDGED)
    return (all((a.get(k) or 0.0) >= (b.get(k) or 0.0) for k in JUDGED)
            and score(a) > score(b))
