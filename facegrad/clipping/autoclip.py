"""AutoClip (Seetharaman et al. 2020): clip the global L2 norm to a percentile of its history."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .norm import clip_coef


class AutoClip:
    """History of global gradient norms in a ring buffer on the gradients' device.

    Empty slots hold NaN so the percentile (``torch.nanquantile``) needs no host sync to know
    how many norms have been recorded. Non-finite norms are never recorded.
    """

    def __init__(self, percentile: float = 10.0, warmup_steps: int = 10, history_size: int = 10000):
        self.q = percentile / 100.0
        self.warmup_steps = warmup_steps
        self.history = torch.full((history_size,), math.nan)
        self.count = torch.zeros((), dtype=torch.int64)  # finite norms recorded so far

    def _to(self, device: torch.device) -> None:
        if self.history.device != device:
            self.history = self.history.to(device)
            self.count = self.count.to(device)

    @torch.no_grad()
    def record(self, norm: Tensor) -> tuple[Tensor, Tensor]:
        """Record ``norm`` if finite; return ``(percentile, active)`` as 0-d tensors.

        ``active`` is False for the first ``warmup_steps`` recorded norms.
        """
        self._to(norm.device)
        finite = torch.isfinite(norm)
        idx = (self.count % self.history.numel()).view(1)
        old = self.history.index_select(0, idx)
        new = torch.where(finite, norm.to(self.history.dtype).view(1), old)
        self.history.index_copy_(0, idx, new)
        self.count += finite.to(torch.int64)
        return torch.nanquantile(self.history, self.q), self.count > self.warmup_steps

    @torch.no_grad()
    def clip_(self, grads: list[Tensor], norm: Tensor) -> tuple[Tensor, Tensor]:
        """Record ``norm`` (the grads' global L2 norm), then scale the grads in place.

        Returns ``(coef, threshold)``; threshold is NaN while warming up.
        """
        pct, active = self.record(norm)
        coef = clip_coef(norm, pct)
        coef = torch.where(active, coef, torch.ones_like(coef))
        torch._foreach_mul_(grads, coef)
        return coef, torch.where(active, pct, torch.full_like(pct, math.nan))

    def state_dict(self) -> dict:
        """``{"history": float32 CPU tensor, "count": int}`` (safetensors + JSON friendly)."""
        return {"history": self.history.detach().cpu().clone(), "count": int(self.count)}

    def load_state_dict(self, state: dict) -> None:
        history = torch.as_tensor(state["history"], dtype=torch.float32)
        if history.shape != self.history.shape:
            raise ValueError(
                f"autoclip history has {history.numel()} slots, config says {self.history.numel()}"
            )
        self.history = history.to(self.history.device).clone()
        self.count = torch.tensor(
            int(state["count"]), dtype=torch.int64, device=self.history.device
        )
