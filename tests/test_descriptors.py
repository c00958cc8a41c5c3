"""Face descriptors and identity scoring: LBP histograms, the backbone descriptor, and the
cluster-tightness adjustment of identity scores (facegrad/lbp.py, models.describe, gallery)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from facegrad.gallery import (
    BETWEEN_MEANS_SHARE,
    RUNNER_UP_WEIGHT,
    TIGHTNESS_WEIGHT,
    _between_means,
    _known_floor,
    calibrate_open_set,
    cluster_tightness,
    decide,
    embed,
    identity_scores,
)
from facegrad.lbp import BINS, GRID, lbp_codes, lbp_histograms
from facegrad.models import build_model, describe
from facegrad.preprocess import resize_uint8, standardise, zoom


def _faces(orl, n: int = 6) -> torch.Tensor:
    """(n, 3, 64, 64) float images of n different ORL people (real faces)."""
    from PIL import Image

    train, _ = orl
    names = sorted(train)[:n]
    ims = [np.asarray(Image.open(train[k][0]).convert("RGB").resize((64, 64))) for k in names]
    return torch.from_numpy(np.stack(ims)).permute(0, 3, 1, 2).float()


def test_lbp_codes_of_known_patterns():
    flat = torch.full((1, 3, 3), 5.0)
    spot = flat.clone()
    spot[0, 1, 1] = 9.0  # brighter than every neighbour: code 0, a uniform pattern
    dip = flat.clone()
    dip[0, 1, 1] = 1.0  # darker than every neighbour: code 255, uniform too
    assert int(lbp_codes(spot)) == 0
    assert int(lbp_codes(dip)) == int(lbp_codes(flat))  # ties count as "at least as bright"
    noisy = torch.tensor([[[9.0, 0.0, 9.0], [0.0, 5.0, 0.0], [9.0, 0.0, 9.0]]])
    assert int(lbp_codes(noisy)) == BINS - 1  # 8 transitions: the non-uniform bin


def test_lbp_ignores_monotonic_lighting_but_not_identity(orl):
    x = _faces(orl)
    d = lbp_histograms(x)
    assert d.shape == (6, GRID * GRID * BINS)
    assert torch.allclose(d.norm(dim=1), torch.ones(6), atol=1e-5)
    harsh = 255 * (x / 255) ** 2.2 * 0.5 + 40  # darker, steeper contrast, brighter floor
    assert torch.allclose(lbp_histograms(harsh), d, atol=0.05)
    sims = d @ d.t()
    same = lbp_histograms(harsh) @ d.t()
    assert (same.diag() > sims.fill_diagonal_(-1).max(1).values).all()


def test_backbone_descriptor_mirrors_with_the_face():
    torch.manual_seed(0)
    net = build_model("facenet_s", 5).eval()
    x = standardise(torch.rand(2, 3, 64, 64) * 255)
    with torch.no_grad():
        d = describe(net, x, "backbone", flip_tta=True).view(2, -1, 2, 2)
        dm = describe(net, x.flip(3), "backbone", flip_tta=True).view(2, -1, 2, 2)
        assert torch.allclose(dm, d.flip(3), atol=1e-4)  # left stays left
        both = describe(net, x, "backbone+lbp", lbp_share=0.35)
    n_backbone = d[0].numel()
    assert torch.allclose(both[:, :n_backbone].norm(dim=1) ** 2, torch.full((2,), 0.65), atol=1e-4)
    assert torch.allclose(both[:, n_backbone:].norm(dim=1) ** 2, torch.full((2,), 0.35), atol=1e-4)


def test_zoom_scales_the_content_about_the_centre():
    x = torch.zeros(1, 1, 64, 64)
    x[..., 16:48, 16:48] = 1.0  # a centred 32-pixel square
    assert zoom(x, 1.0) is x
    small = zoom(x, 0.5)
    assert small.shape == x.shape
    assert float((small > 0.5).sum()) == pytest.approx(16 * 16, rel=0.15)
    assert float(small[..., 32, 32]) == pytest.approx(1.0) and float(small[..., 20, 20]) == 0.0
    assert float((zoom(x, 1.5) > 0.5).sum()) == pytest.approx(48 * 48, rel=0.15)


def test_embed_adds_the_normalised_descriptors_of_each_scale():
    torch.manual_seed(0)
    net = build_model("facenet_s", 5).eval()
    crops = (torch.rand(3, 64, 64, 3) * 255).to(torch.uint8).numpy()
    kw = {"flip_tta": True, "descriptor": "backbone+lbp"}
    both = embed(net, crops, 64, scales=(1.0, 0.9), **kw)
    # as embed prepares them (LBP codes compare neighbouring pixels: rounding flips ties)
    x = standardise(resize_uint8(torch.from_numpy(crops), 64))
    with torch.no_grad():
        parts = [F.normalize(describe(net, zoom(x, s), "backbone+lbp", True), dim=1)
                 for s in (1.0, 0.9)]
    assert torch.allclose(both, F.normalize(parts[0] + parts[1], dim=1), atol=1e-5)
    plain = embed(net, crops, 64, **kw)
    assert torch.allclose(plain, parts[0], atol=1e-5)  # one scale: as before
    assert not torch.allclose(both, plain, atol=1e-3)


def test_mid_stage_descriptor_weighs_both_stages():
    """New models put the third stage beside the last (mid_share); mid_share 0 is the older
    models' descriptor, the last stage alone, unchanged."""
    torch.manual_seed(0)
    old = build_model("facenet_s", 5).eval()
    new = build_model("facenet_s", 5, mid_share=0.65).eval()
    new.load_state_dict(old.state_dict())
    x = standardise(torch.rand(3, 3, 64, 64) * 255)
    with torch.no_grad():
        last = F.adaptive_avg_pool2d(old.blocks(old.stem(x)), 2)
        mid = F.adaptive_avg_pool2d(old.blocks[:3](old.stem(x)), 2)
        assert torch.equal(old.descriptor_map(x), last)
        d = new.descriptor_map(x)
        assert d.shape == (3, 128 + 256, 2, 2)
        parts = d[:, :128].flatten(1), d[:, 128:].flatten(1)
        assert torch.allclose(parts[0].norm(dim=1) ** 2, torch.full((3,), 0.65), atol=1e-5)
        assert torch.allclose(parts[1].norm(dim=1) ** 2, torch.full((3,), 0.35), atol=1e-5)
        assert torch.allclose(F.normalize(parts[0], dim=1), F.normalize(mid.flatten(1), dim=1),
                              atol=1e-5)
        # a cosine of two descriptors is 0.65 of the mid stage's plus 0.35 of the last's
        cos = lambda a: F.normalize(a.flatten(1), dim=1)  # noqa: E731
        want = 0.65 * (cos(mid)[0] @ cos(mid)[1]) + 0.35 * (cos(last)[0] @ cos(last)[1])
        assert torch.allclose(d[0].flatten() @ d[1].flatten(), want, atol=1e-5)
        # the flip test-time augmentation still mirrors the face's descriptor with the face
        a = describe(new, x, "backbone", flip_tta=True).view(3, -1, 2, 2)
        b = describe(new, x.flip(3), "backbone", flip_tta=True).view(3, -1, 2, 2)
        assert torch.allclose(b, a.flip(3), atol=1e-4)
    assert build_model("seed_cnn", 5, mid_share=0.65).descriptor_map(x).shape == (3, 128, 1, 1)
    with pytest.raises(ValueError):
        build_model("facenet_s", 5, mid_share=1.5)


def _cluster(centre: torch.Tensor, spread: float, n: int, gen: torch.Generator) -> torch.Tensor:
    return F.normalize(centre + spread * torch.randn(n, centre.numel(), generator=gen), dim=1)


def test_tightness_adjustment_favours_loose_identities():
    gen = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(2, 32, generator=gen), dim=1)
    tight = _cluster(centres[0], 0.02, 5, gen)
    loose = _cluster(centres[1], 0.2, 5, gen)
    gallery = torch.cat([tight, loose])
    owner = torch.tensor([0] * 5 + [1] * 5)
    t = cluster_tightness(gallery, owner, 3, default=0.5)
    assert t[0] > t[1] and t[2] == 0.5  # identity 2 has no images
    probe = F.normalize(torch.randn(1, 32, generator=gen), dim=1)
    raw = identity_scores(probe, gallery, owner, 3)
    adj = identity_scores(probe, gallery, owner, 3, t, reference=0.5)
    expect = raw[0, :2] - TIGHTNESS_WEIGHT * (t[:2] - 0.5)
    assert torch.allclose(adj[0, :2], expect)
    assert adj[0, 2] == -2.0  # still no images, still below any score


def test_calibration_records_adjustment_and_separates_people():
    """Well-separated synthetic people: the threshold lies between strangers and genuine."""
    gen = torch.Generator().manual_seed(1)
    centres = F.normalize(torch.randn(12, 64, generator=gen), dim=1)
    emb = torch.cat([_cluster(c, 0.05, 8, gen) for c in centres])
    owner = torch.arange(12).repeat_interleave(8)
    probes = torch.cat([_cluster(c, 0.05, 1, gen) for c in centres[:9]])
    rec = calibrate_open_set(emb, owner, 12, [9, 10, 11], probes, torch.arange(9), None)
    adj = rec["score_adjustment"]
    assert adj["method"] == "cluster_tightness" and adj["weight"] == TIGHTNESS_WEIGHT
    assert 0.8 < adj["reference"] <= 1.0
    assert rec["fpir"] == 0.0 and rec["enrolled_rank1"] == 1.0 and rec["rank1"] == 1.0
    assert rec["held_out_identities"] == 3
    # strangers this far from everyone pull the balance point and the point between the means
    # down towards them: the threshold stays at the score 99% of the known faces reach
    assert rec["balance_point"] < rec["known_floor"] and rec["between_means"] < rec["known_floor"]
    assert rec["threshold"] == pytest.approx(rec["known_floor"], abs=1e-6)
    assert rec["enrolled_tpir"] >= 0.85 and rec["tpir"] >= 0.85
    # the runner-up's usual level among known faces: another person, so far below a match
    assert adj["runner_up_weight"] == RUNNER_UP_WEIGHT
    assert -1 < adj["runner_up_reference"] < rec["threshold"]


def test_decide_lowers_faces_another_identity_fits_nearly_as_well():
    adj = {"runner_up_weight": 0.5, "runner_up_reference": 0.4}
    scores = torch.tensor([[0.9, 0.4, 0.1],     # runner-up at its usual level: the best score
                           [0.9, 0.8, 0.1],     # another identity fits nearly as well
                           [0.9, 0.2, 0.1],     # runner-up far below usual: a little raised
                           [-2.0, 0.7, -2.0]])  # one identity with images: nothing to weigh
    best, d = decide(scores, adj)
    assert best.tolist() == [0, 0, 0, 1]
    assert torch.allclose(d, torch.tensor([0.9, 0.9 - 0.5 * 0.4, 0.9 + 0.5 * 0.2, 0.7]))
    # models calibrated before the runner-up counted decide on the best score
    assert torch.allclose(decide(scores, {"reference": 0.9})[1], torch.tensor([0.9] * 3 + [0.7]))
    assert torch.allclose(decide(scores[:, :1], adj)[1], scores[:, 0])  # a single column


def test_known_floor_is_the_known_faces_lower_tail():
    gen = torch.Generator().manual_seed(3)
    scores = 0.9 + 0.02 * torch.randn(20000, generator=gen)
    assert _known_floor(scores) == pytest.approx(0.9 - 2.326 * 0.02, abs=1e-3)  # 99 %
    assert _known_floor(scores, 0.95) == pytest.approx(0.9 - 1.645 * 0.02, abs=1e-3)
    assert _known_floor(scores, 0.5) == pytest.approx(0.9, abs=1e-3)
    assert _known_floor(scores[:1]) is None


def test_between_means_lies_between_strangers_and_known_faces():
    known, strangers = torch.tensor([0.9, 0.92, 0.94]), torch.tensor([0.78, 0.8, 0.82])
    assert _between_means(known, strangers) == pytest.approx(0.8 + BETWEEN_MEANS_SHARE * 0.12)
    assert _between_means(known, strangers, 0.5) == pytest.approx(0.86)
    assert _between_means(known, strangers[:0]) is None


def test_threshold_above_the_floor_when_strangers_come_close():
    """People who resemble each other: the threshold is the higher of the balance point and the
    point between the means, above the known faces' lower tail; with target_fpir none of them."""
    gen = torch.Generator().manual_seed(4)
    base = F.normalize(torch.randn(64, generator=gen), dim=0)
    centres = F.normalize(base + 0.04 * torch.randn(12, 64, generator=gen), dim=1)
    emb = torch.cat([_cluster(c, 0.05, 8, gen) for c in centres])
    owner = torch.arange(12).repeat_interleave(8)
    probes = torch.cat([_cluster(c, 0.05, 1, gen) for c in centres[:9]])
    rec = calibrate_open_set(emb, owner, 12, [9, 10, 11], probes, torch.arange(9), None)
    assert rec["known_floor"] is not None and rec["threshold"] > rec["known_floor"]
    points = (rec["balance_point"], rec["between_means"], rec["known_floor"])
    assert rec["threshold"] == pytest.approx(max(points), abs=1e-6)
    assert 0 < rec["fpir"] < 0.5  # the strangers overlap the known faces
    rec = calibrate_open_set(emb, owner, 12, [9, 10, 11], probes, torch.arange(9), 0.05)
    assert rec["policy"] == "target_fpir"
    assert rec["known_floor"] is None and rec["between_means"] is None
    assert rec["balance_point"] is None
