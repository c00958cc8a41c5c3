"""Adaptive gradient clipping, unit-wise (Brock et al. 2021, NFNets; cf. timm's agc.py)."""

from __future__ import annotations

import torch
from torch import Tensor


def unitwise_norm(x: Tensor) -> Tensor:
    """L2 norm per output unit (all dims but 0) for ndim > 1, of the whole tensor otherwise."""
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


@torch.no_grad()
def clip_agc_(
    params: list[Tensor], grads: list[Tensor], clip_factor: float = 0.01, eps: float = 1e-3
) -> Tensor:
    """Where ``||g||_unit > clip_factor * max(||w||_unit, eps)``, scale that unit down to it.

    Operates in place on ``grads`` (paired with ``params``); units whose gradient norm is not
    finite are left alone. Returns a 0-d bool tensor: whether any unit was scaled.
    """
    fired = []
    for p, g in zip(params, grads, strict=True):
        max_norm = unitwise_norm(p.detach()).clamp(min=eps).mul_(clip_factor)
        g_norm = unitwise_norm(g)
        clip = (g_norm > max_norm) & torch.isfinite(g_norm)
        scale = torch.where(clip, max_norm / g_norm.clamp(min=1e-6), torch.ones_like(g_norm))
        g.mul_(scale)
        fired.append(clip.any())
    return torch.stack(fired).any()
