"""Within-class covariance normalisation of descriptors (facegrad/within_class.py)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from facegrad import within_class
from facegrad.lbp import lbp_histograms


def _people(n_people: int, per: int, dim: int, nuisance: torch.Tensor, seed: int):
    """Unit descriptors: a random identity centre plus large variation along ``nuisance``
    (the same few directions for everyone, as pose and lighting are) and small noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_people, dim, generator=g)
    coef = torch.randn(n_people * per, nuisance.shape[1], generator=g) * 3.0
    x = centres.repeat_interleave(per, 0) + coef @ nuisance.t() \
        + 0.3 * torch.randn(n_people * per, dim, generator=g)
    return F.normalize(x, dim=1), torch.arange(n_people).repeat_interleave(per)


def _separation(emb: torch.Tensor, labels: torch.Tensor) -> float:
    """(mean same-person cosine - mean different-person cosine) / different-person std."""
    s = emb @ emb.t()
    iu = torch.triu_indices(len(labels), len(labels), 1)
    sv, same = s[iu[0], iu[1]], (labels[iu[0]] == labels[iu[1]])
    return float((sv[same].mean() - sv[~same].mean()) / sv[~same].std())


def test_learns_the_shared_variation_and_helps_unseen_people():
    dim = 64
    nuisance = torch.linalg.qr(torch.randn(dim, 4, generator=torch.Generator().manual_seed(1)))[0]
    train, y = _people(20, 6, dim, nuisance, seed=2)
    wc = within_class.fit(train, y.numpy())
    assert wc is not None and wc.identities == 20 and wc.fitted_on == 120
    assert torch.allclose(wc.basis.t() @ wc.basis, torch.eye(wc.basis.shape[1]), atol=1e-4)
    assert ((0 <= wc.shrink) & (wc.shrink < 1)).all()
    # the most-shrunk directions are the shared nuisance ones
    top = wc.basis[:, :4]
    assert torch.linalg.svdvals(nuisance.t() @ top).min() > 0.95
    # people it never saw are told apart better
    new, y_new = _people(15, 5, dim, nuisance, seed=3)
    before = _separation(new, y_new)
    after_emb = wc.apply_(new.clone())
    assert torch.allclose(after_emb.norm(dim=1), torch.ones(len(new)), atol=1e-5)
    assert _separation(after_emb, y_new) > 1.5 * before


def test_helps_real_faces_of_people_it_never_saw(orl):
    """LBP descriptors of 20 ORL people fit it; the 20 others are told apart better."""
    train, test = orl
    names = sorted(train)

    def lbp(people):
        paths = [p for n in people for p in train[n] + test[n]]
        ims = np.stack([np.asarray(Image.open(p).convert("RGB").resize((64, 64)))
                        for p in paths])
        x = torch.from_numpy(ims).permute(0, 3, 1, 2).float()
        return lbp_histograms(x), torch.tensor([i for i, n in enumerate(people)
                                                for _ in train[n] + test[n]])

    fit_x, fit_y = lbp(names[:20])
    new_x, new_y = lbp(names[20:])
    wc = within_class.fit(fit_x, fit_y)
    before = _separation(new_x, new_y)
    after = _separation(wc.apply_(new_x.clone()), new_y)
    assert after > 1.2 * before, (before, after)


def test_none_without_within_person_variation_and_caps():
    x = F.normalize(torch.randn(10, 8), dim=1)
    assert within_class.fit(x, np.arange(10)) is None  # one image each
    assert within_class.fit(x, np.array([0] * 9 + [1])) is None  # one identity with 2+
    y = np.repeat(np.arange(5), 2)
    wc = within_class.fit(x, y, max_rank=3)
    assert wc.basis.shape == (8, 3) and wc.shrink.shape == (3,)
    big = F.normalize(torch.randn(300, 16), dim=1)
    labels = np.repeat(np.arange(30), 10)
    a = within_class.fit(big, labels, max_rows=100, seed=4)
    b = within_class.fit(big, labels, max_rows=100, seed=4)
    assert a.fitted_on == 100 and torch.equal(a.basis, b.basis)


def test_round_trips_through_tensors():
    x = F.normalize(torch.randn(40, 12), dim=1)
    wc = within_class.fit(x, np.repeat(np.arange(8), 5))
    rec = wc.record()
    assert rec["method"] == "wccn" and rec["rank"] == wc.basis.shape[1]
    back = within_class.WithinClassNorm.from_tensors(wc.tensors(), rec)
    assert torch.equal(back.basis, wc.basis) and back.fitted_on == 40
    assert within_class.WithinClassNorm.from_tensors({}, {}) is None
    assert torch.allclose(back.apply_(x.clone()), wc.apply_(x.clone()))
