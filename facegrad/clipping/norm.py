"""Norm clipping: global (torch clip_grad_norm_) and per tensor (Keras clipnorm).

Both scale by torch's coefficient ``max_norm / (norm + 1e-6)`` where ``norm > max_norm``, and
leave the gradients bit-for-bit alone otherwise (torch would multiply by ``1 - ~1e-6/max_norm``
when norm == max_norm). A non-finite norm never scales anything; the caller decides what to do
with such a step.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

EPS = 1e-6


def max_abs(grads: Sequence[Tensor]) -> list[Tensor]:
    """Per-tensor ``max|g|`` (the inf-norm) as 0-d tensors; NaN for a tensor holding a NaN.

    On CUDA one fused foreach kernel. On the CPU torch's inf-norm reduction is not vectorised
    (measured 15-60x slower than the L2 one on this project's models, see
    bench/clip_overhead.py), so each tensor gets one ``aminmax`` pass instead.
    """
    if not grads:
        return []
    if grads[0].device.type != "cpu":
        return list(torch._foreach_norm(list(grads), math.inf))
    out = []
    for g in grads:
        if g.numel() == 0:
            out.append(g.new_zeros(()))
            continue
        lo, hi = torch.aminmax(g)
        out.append(torch.maximum(lo.abs(), hi.abs()))
    return out


def tensor_norms(grads: list[Tensor], p: float, l2: Sequence[Tensor] | None = None) -> list[Tensor]:
    """Per-tensor p-norms (one foreach kernel); reuses ``l2`` when p == 2."""
    if p == 2.0 and l2 is not None:
        return list(l2)
    if p == math.inf:
        return max_abs(grads)
    return list(torch._foreach_norm(grads, p))


def total_norm(norms: Sequence[Tensor], p: float) -> Tensor:
    """The p-norm of all gradients together, from their per-tensor p-norms."""
    return torch.linalg.vector_norm(torch.stack(list(norms)), p)


def clip_coef(norm: Tensor, max_norm: float | Tensor) -> Tensor:
    """``max_norm / (norm + 1e-6)`` where ``norm > max_norm`` and finite, else 1."""
    fire = (norm > max_norm) & torch.isfinite(norm)
    return torch.where(fire, max_norm / (norm + EPS), torch.ones_like(norm))


@torch.no_grad()
def clip_norm_global_(
    grads: list[Tensor],
    max_norm: float | Tensor,
    p: float = 2.0,
    l2: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Scale all grads by one coefficient so their joint p-norm is <= max_norm.

    Returns ``(total_norm, coef)`` as 0-d tensors.
    """
    total = total_norm(tensor_norms(grads, p, l2), p)
    coef = clip_coef(total, max_norm)
    torch._foreach_mul_(grads, coef)
    return total, coef


@torch.no_grad()
def clip_norm_per_tensor_(
    grads: list[Tensor],
    max_norm: float,
    p: float = 2.0,
    l2: Sequence[Tensor] | None = None,
) -> Tensor:
    """Clip each tensor's own p-norm to max_norm. Returns the 1-D tensor of coefficients."""
    coefs = clip_coef(torch.stack(tensor_norms(grads, p, l2)), max_norm)
    torch._foreach_mul_(grads, list(coefs.unbind()))
    return coefs
