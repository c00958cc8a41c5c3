"""The origin document's rule: T = alpha * max|g|; every g with |g| > T becomes 0."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from .norm import max_abs


@torch.no_grad()
def clip_threshold_(
    grads: list[Tensor], alpha: float, scope: Literal["global", "per_tensor"] = "global"
) -> tuple[Tensor, Tensor]:
    """Zero, in place, every element whose magnitude is strictly greater than T.

    T is ``alpha * max|g|`` over all tensors (``global``) or over each tensor (``per_tensor``).
    Returns ``(zeroed, T)``: the int64 count of zeroed elements and, for ``global``, T
    (NaN for ``per_tensor``).
    """
    tops = torch.stack(max_abs(grads))
    if scope == "global":
        t = alpha * tops.max()
        thresholds = [t] * len(grads)
    else:
        t = torch.full((), math.nan, device=tops.device, dtype=tops.dtype)
        thresholds = list((alpha * tops).unbind())
    counts = []
    for g, thr in zip(grads, thresholds, strict=True):
        mask = g.abs() > thr
        counts.append(mask.sum())
        g.masked_fill_(mask, 0)
    return torch.stack(counts).sum(), t
