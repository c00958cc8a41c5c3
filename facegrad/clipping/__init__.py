"""Gradient clipping: one small module per mode, ``build_clipper`` dispatch and telemetry.

Usage: after backward (and ``scaler.unscale_``), before ``optimizer.step()``::

    clipper = build_clipper(cfg.clip, model)
    result = clipper(model.parameters())
    telemetry.update(result)  # then skip or fail the step yourself if not result.finite
"""

from __future__ import annotations

from torch import nn

from .base import Clipper, ClipResult
from .clippers import (
    AGCClipper,
    AutoClipClipper,
    NormClipper,
    ThresholdClipper,
    ValueClipper,
    output_layer_params,
)
from .modes import CLIP_MODES, ClipMode, clip_mode, register
from .telemetry import ClipTelemetry

__all__ = [
    "CLIP_MODES",
    "AGCClipper",
    "AutoClipClipper",
    "ClipMode",
    "ClipResult",
    "ClipTelemetry",
    "Clipper",
    "NormClipper",
    "ThresholdClipper",
    "ValueClipper",
    "build_clipper",
    "clip_mode",
    "output_layer_params",
    "register",
]


def build_clipper(cfg, model: nn.Module) -> Clipper:
    """The Clipper for a clip config (one of :data:`CLIP_MODES`' config classes)."""
    entry = CLIP_MODES.get(getattr(cfg, "mode", None))
    if entry is None or not isinstance(cfg, entry.config):
        raise TypeError(f"unknown clip config {type(cfg).__name__}")
    return entry.clipper.for_model(cfg, model)
