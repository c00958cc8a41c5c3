"""ClipResult and the Clipper base class shared by every mode."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from .norm import total_norm


@dataclass(frozen=True)
class ClipResult:
    """One step's clipping outcome; every field is a 0-d tensor on the gradients' device."""

    norm_pre: Tensor  # global L2 norm of all grads before clipping
    norm_post: Tensor  # global L2 norm after clipping
    clipped: Tensor  # bool: clipping changed something (always False when not finite)
    zeroed: Tensor  # int64: elements set to 0 (threshold mode only)
    finite: Tensor  # bool: norm_pre is finite
    threshold: Tensor  # effective norm threshold, NaN where the mode has none
    # per_example only (None elsewhere): how many examples (or people) the step clipped one by
    # one, how many of them were above the threshold, and their pre-clip norms' sum and max
    examples: Tensor | None = None
    examples_clipped: Tensor | None = None
    example_norm_sum: Tensor | None = None
    example_norm_max: Tensor | None = None


class Clipper:
    """Base class: ``clipper(model.parameters()) -> ClipResult``; this one clips nothing."""

    mode = "none"

    @classmethod
    def for_model(cls, cfg, model: torch.nn.Module) -> Clipper:
        """The clipper of ``cfg`` for ``model``'s parameters (what ``build_clipper`` calls)."""
        return cls() if cls is Clipper else cls(cfg)

    @torch.no_grad()
    def __call__(self, parameters: Iterable[torch.nn.Parameter]) -> ClipResult:
        params = [p for p in parameters if p.grad is not None]
        if not params:
            zero = torch.zeros(())
            false = torch.zeros((), dtype=torch.bool)
            return ClipResult(
                zero, zero, false, torch.zeros((), dtype=torch.int64), ~false, zero + math.nan
            )
        grads = [p.grad for p in params]
        l2 = list(torch._foreach_norm(grads, 2.0))
        pre = total_norm(l2, 2.0)
        finite = torch.isfinite(pre)
        post, clipped, zeroed, thr = self._clip(params, grads, l2, pre)
        if zeroed is None:
            zeroed = torch.zeros((), dtype=torch.int64, device=pre.device)
        if thr is None:
            thr = torch.full_like(pre, math.nan)
        return ClipResult(pre, post, clipped & finite, zeroed, finite, thr)

    def _clip(self, params, grads, l2, pre):
        """Clip ``grads`` in place; return ``(norm_post, clipped, zeroed|None, threshold|None)``."""
        return pre, torch.zeros_like(pre, dtype=torch.bool), None, None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"clip mode {self.mode!r} has no state, got keys {sorted(state)}")
