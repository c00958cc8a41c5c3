"""Within-class covariance normalisation (WCCN) of face descriptors.

Most of how one person's photos differ from each other (pose, expression, lighting, glasses on
or off) differs the same way for everybody. Measured on the images of the people a model was
trained on, those directions of within-person variation are shrunk in every descriptor, so
that what is left to compare is mostly what tells people apart, for strangers and people
enrolled later too. With S_w the within-class covariance of the (normalised) training
descriptors and ``lam = strength *`` their mean per-dimension variance, a descriptor x becomes
``(S_w + lam I)^(-1/2) x`` up to scale, normalised again. Only the top ``max_rank`` eigen-
directions of S_w are kept (D x r floats: the others shrink by little, and a full D x D matrix
would cost 92 MB for the default 4800-d descriptor), so the map is
``x - U diag(shrink) U^T x`` with ``shrink = 1 - sqrt(lam / (lam + eigenvalue))``.

Fitted on the training images of the trained identities only: the identities held out for
calibration stay strangers to it, so the calibrated thresholds remain honest. On ORL (30
people, 6 of them held out; four training draws) it raised the worst of issue 5's four
open-set ratios at the calibrated threshold from 0.889-0.994 to 0.982-1.023, mostly by
rejecting strangers who resemble a trained person; see docs/benchmarks.md ("Session 3").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

STRENGTH = 0.3  # regularisation, as a multiple of the descriptors' mean per-dimension variance
MAX_RANK = 256  # eigen-directions kept
MAX_ROWS = 2000  # images the covariance is estimated from (a seeded sample beyond that)


@dataclass
class WithinClassNorm:
    basis: torch.Tensor  # (D, r) orthonormal directions of within-person variation
    shrink: torch.Tensor  # (r,) share of each direction taken out, in [0, 1)
    strength: float = STRENGTH
    fitted_on: int = 0  # images
    identities: int = 0

    def apply_(self, emb: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """Normalise (N, D) descriptors in place, a chunk at a time; unit length again."""
        basis, shrink = self.basis.to(emb.device), self.shrink.to(emb.device)
        for i in range(0, emb.shape[0], chunk):
            part = emb[i:i + chunk]
            part -= ((part @ basis) * shrink) @ basis.t()
            part.div_(part.norm(dim=1, keepdim=True).clamp_min(1e-12))
        return emb

    def tensors(self, prefix: str = "within_class.") -> dict[str, torch.Tensor]:
        return {prefix + "basis": self.basis.contiguous(), prefix + "shrink": self.shrink}

    @classmethod
    def from_tensors(cls, tensors: dict, record: dict,
                     prefix: str = "within_class.") -> WithinClassNorm | None:
        if prefix + "basis" not in tensors:
            return None
        return cls(tensors[prefix + "basis"].float(), tensors[prefix + "shrink"].float(),
                   float(record.get("strength", STRENGTH)), int(record.get("fitted_on", 0)),
                   int(record.get("identities", 0)))

    def record(self) -> dict:
        """What the model's metadata says about it."""
        return {"method": "wccn", "strength": self.strength, "rank": int(self.basis.shape[1]),
                "fitted_on": self.fitted_on, "identities": self.identities}


def fit(emb: torch.Tensor, labels: np.ndarray | torch.Tensor, strength: float = STRENGTH,
        max_rank: int = MAX_RANK, max_rows: int = MAX_ROWS, seed: int = 0
        ) -> WithinClassNorm | None:
    """WCCN from (N, D) normalised descriptors and their identities; None when fewer than two
    identities have two or more images (there is no within-person variation to measure)."""
    labels = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    ids, counts = torch.unique(labels, return_counts=True)
    multi = ids[counts >= 2]
    if len(multi) < 2:
        return None
    rows = torch.nonzero(torch.isin(labels, multi)).view(-1)
    if len(rows) > max_rows:
        pick = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))
        rows = torch.sort(rows[pick[:max_rows]]).values
    x, y = emb[rows].float(), labels[rows]
    _, y = torch.unique(y, return_inverse=True)
    sizes = torch.bincount(y).clamp_min(1).view(-1, 1).float()
    means = torch.zeros(int(y.max()) + 1, x.shape[1]).index_add_(0, y, x) / sizes
    xc = x - means[y]  # within-class residuals (n, D)
    # eigen-directions of S_w = xc^T xc / n from the small n x n Gram matrix
    gram = (xc @ xc.t()).double() / len(xc)
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)[:max_rank]
    evals, evecs = evals[order], evecs[:, order]
    # float32 residuals: directions this far below the top one are rounding noise, and would
    # hardly shrink anyway
    keep = evals > 1e-6 * max(float(evals[0]), 1e-30)
    evals, evecs = evals[keep], evecs[:, keep]
    basis = (xc.t() @ evecs.float()) / torch.sqrt(evals * len(xc)).float()  # (D, r), orthonormal
    lam = strength * float(x.var(0).mean())
    shrink = 1 - torch.sqrt(lam / (lam + evals))
    return WithinClassNorm(basis, shrink.float(), strength, int(len(rows)),
                           int(len(multi)))
