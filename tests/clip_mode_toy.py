"""A toy clip mode for tests/test_registry.py: what a new mode is, its config and its clipper,
registered by one line (``register(TOY)``)."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from facegrad.clipping import ClipMode, Clipper
from facegrad.clipping.config import ClipModeConfig


class ClipScale(ClipModeConfig):
    """Multiply every gradient element by ``factor``."""

    mode: Literal["scale"]
    factor: float = Field(0.5, gt=0, le=1)


class ScaleClipper(Clipper):
    mode = "scale"

    def __init__(self, cfg: ClipScale):
        self.factor = cfg.factor

    def _clip(self, params, grads, l2, pre):
        torch._foreach_mul_(grads, self.factor)
        return pre * self.factor, torch.ones_like(pre, dtype=torch.bool), None, None


TOY = ClipMode("scale", ClipScale, ScaleClipper, "factor", "scale:0.5",
               "multiply the gradient by factor")
