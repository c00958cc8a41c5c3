"""Element-wise value clipping (torch.nn.utils.clip_grad_value_ / Keras clipvalue)."""

from __future__ import annotations

import torch
from torch import Tensor

from .norm import max_abs


@torch.no_grad()
def clip_value_(grads: list[Tensor], clip_value: float) -> Tensor:
    """Clamp every element of ``grads`` to [-clip_value, clip_value] in place.

    Returns a 0-d bool tensor: whether any element was outside the range.
    """
    top = torch.stack(max_abs(grads)).max()
    torch._foreach_clamp_min_(grads, -clip_value)
    torch._foreach_clamp_max_(grads, clip_value)
    return top > clip_value
